/*
 * Drives a vesh server with libssh (libssh.org) for the interoperability
 * suite; Debian packages no libssh-based client that a script can run for an
 * exec, a terminal and SFTP, so the test compiles this one against libssh-dev.
 *
 * Usage: libssh-client PORT USER KEYFILE KNOWN_HOSTS UPLOAD_SRC DOWNLOAD_DST
 * Prints one JSON object: the library version, the exec result, what the
 * terminal session printed and its exit status. The host key must be in
 * KNOWN_HOSTS; the upload goes to /root/libssh.bin and comes back to
 * DOWNLOAD_DST. Exits 1 with a message on stderr when any step fails.
 */
#include <fcntl.h>
#include <libssh/libssh.h>
#include <libssh/sftp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define REMOTE_FILE "/root/libssh.bin"

static void fail(ssh_session s, const char *what)
{
	fprintf(stderr, "libssh-client: %s: %s\n", what, s ? ssh_get_error(s) : "");
	exit(1);
}

/* A growing byte buffer for what a channel sends. */
struct buf {
	char *data;
	size_t len;
};

static void buf_add(struct buf *b, const char *p, size_t n)
{
	char *d = realloc(b->data, b->len + n + 1);
	if (!d) {
		fprintf(stderr, "libssh-client: out of memory\n");
		exit(1);
	}
	memcpy(d + b->len, p, n);
	b->len += n;
	d[b->len] = '\0';
	b->data = d;
}

static void print_json_string(const struct buf *b)
{
	putchar('"');
	for (size_t i = 0; i < b->len; i++) {
		unsigned char c = (unsigned char)b->data[i];
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c == '\n')
			fputs("\\n", stdout);
		else if (c == '\r')
			fputs("\\r", stdout);
		else if (c < 0x20 || c >= 0x7f)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	putchar('"');
}

/* Reads one stream of a channel (stdout or stderr) to its end. */
static void read_stream(ssh_session s, ssh_channel ch, int is_stderr, struct buf *out)
{
	char chunk[4096];
	for (;;) {
		int n = ssh_channel_read(ch, chunk, sizeof chunk, is_stderr);
		if (n == SSH_ERROR)
			fail(s, "reading a channel");
		if (n == 0)
			return;
		buf_add(out, chunk, (size_t)n);
	}
}

static ssh_channel open_session(ssh_session s)
{
	ssh_channel ch = ssh_channel_new(s);
	if (!ch || ssh_channel_open_session(ch) != SSH_OK)
		fail(s, "opening a session channel");
	return ch;
}

static void close_channel(ssh_channel ch)
{
	ssh_channel_send_eof(ch);
	ssh_channel_close(ch);
	ssh_channel_free(ch);
}

static void upload(ssh_session s, sftp_session sftp, const char *src)
{
	int fd = open(src, O_RDONLY);
	if (fd < 0) {
		perror(src);
		exit(1);
	}
	sftp_file f = sftp_open(sftp, REMOTE_FILE, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (!f)
		fail(s, "sftp open for writing");
	char chunk[16384];
	ssize_t n;
	while ((n = read(fd, chunk, sizeof chunk)) > 0) {
		if (sftp_write(f, chunk, (size_t)n) != n)
			fail(s, "sftp write");
	}
	if (n < 0) {
		perror(src);
		exit(1);
	}
	close(fd);
	if (sftp_close(f) != SSH_OK)
		fail(s, "sftp close after writing");
}

static void download(ssh_session s, sftp_session sftp, const char *dst)
{
	sftp_file f = sftp_open(sftp, REMOTE_FILE, O_RDONLY, 0);
	if (!f)
		fail(s, "sftp open for reading");
	int fd = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0) {
		perror(dst);
		exit(1);
	}
	char chunk[16384];
	ssize_t n;
	while ((n = sftp_read(f, chunk, sizeof chunk)) > 0) {
		if (write(fd, chunk, (size_t)n) != n) {
			perror(dst);
			exit(1);
		}
	}
	if (n < 0)
		fail(s, "sftp read");
	close(fd);
	sftp_close(f);
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s PORT USER KEYFILE KNOWN_HOSTS UPLOAD_SRC DOWNLOAD_DST\n", argv[0]);
		return 2;
	}
	unsigned int port = (unsigned int)atoi(argv[1]);
	int no = 0;
	ssh_session s = ssh_new();
	if (!s)
		fail(NULL, "ssh_new");
	/* Only what is given here: no ~/.ssh/config, no system known_hosts. */
	ssh_options_set(s, SSH_OPTIONS_PROCESS_CONFIG, &no);
	ssh_options_set(s, SSH_OPTIONS_HOST, "127.0.0.1");
	ssh_options_set(s, SSH_OPTIONS_PORT, &port);
	ssh_options_set(s, SSH_OPTIONS_USER, argv[2]);
	ssh_options_set(s, SSH_OPTIONS_KNOWNHOSTS, argv[4]);
	ssh_options_set(s, SSH_OPTIONS_GLOBAL_KNOWNHOSTS, "/dev/null");
	if (ssh_connect(s) != SSH_OK)
		fail(s, "connecting");
	if (ssh_session_is_known_server(s) != SSH_KNOWN_HOSTS_OK)
		fail(s, "the server's host key is not the one in KNOWN_HOSTS");

	ssh_key key;
	if (ssh_pki_import_privkey_file(argv[3], NULL, NULL, NULL, &key) != SSH_OK)
		fail(s, "reading the private key");
	if (ssh_userauth_publickey(s, NULL, key) != SSH_AUTH_SUCCESS)
		fail(s, "public key authentication");
	ssh_key_free(key);

	struct buf out = { 0 }, err = { 0 }, term = { 0 };
	ssh_channel ch = open_session(s);
	if (ssh_channel_request_exec(ch, "echo to-out; echo to-err >&2; exit 7") != SSH_OK)
		fail(s, "exec request");
	read_stream(s, ch, 0, &out);
	read_stream(s, ch, 1, &err);
	int exec_status = ssh_channel_get_exit_status(ch);
	close_channel(ch);

	ch = open_session(s);
	if (ssh_channel_request_pty_size(ch, "xterm", 100, 30) != SSH_OK)
		fail(s, "pty request");
	if (ssh_channel_request_shell(ch) != SSH_OK)
		fail(s, "shell request");
	const char *typed = "echo TERM=$TERM; tty; stty size; exit 4\n";
	if (ssh_channel_write(ch, typed, (uint32_t)strlen(typed)) == SSH_ERROR)
		fail(s, "writing to the terminal");
	read_stream(s, ch, 0, &term);
	int pty_status = ssh_channel_get_exit_status(ch);
	close_channel(ch);

	sftp_session sftp = sftp_new(s);
	if (!sftp || sftp_init(sftp) != SSH_OK)
		fail(s, "starting SFTP");
	upload(s, sftp, argv[5]);
	download(s, sftp, argv[6]);
	sftp_free(sftp);

	printf("{\"version\":\"libssh %s\",\"exec\":{\"stdout\":", ssh_version(0));
	print_json_string(&out);
	fputs(",\"stderr\":", stdout);
	print_json_string(&err);
	printf(",\"status\":%d},\"pty\":{\"output\":", exec_status);
	print_json_string(&term);
	printf(",\"status\":%d}}\n", pty_status);

	ssh_disconnect(s);
	ssh_free(s);
	free(out.data);
	free(err.data);
	free(term.data);
	return 0;
}
