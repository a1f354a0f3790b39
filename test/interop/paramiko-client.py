"""Drives a vesh server with paramiko for the interoperability suite.

Usage: paramiko-client.py PORT USER KEYFILE KNOWN_HOSTS UPLOAD_SRC DOWNLOAD_DST
Prints one JSON object: the library version, the exec result, what the
terminal session printed and its exit status. The host key is checked
against KNOWN_HOSTS (RejectPolicy): an unknown key fails the run.
"""
import json
import sys

import paramiko


def read_all(chan):
    out = b""
    while True:
        data = chan.recv(65536)
        if not data:
            return out
        out += data


def main():
    port, user, keyfile, known_hosts, upload_src, download_dst = sys.argv[1:7]
    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=int(port), username=user, key_filename=keyfile,
                   allow_agent=False, look_for_keys=False, timeout=30)
    result = {"version": paramiko.__version__}

    _, stdout, stderr = client.exec_command("echo to-out; echo to-err >&2; exit 7")
    result["exec"] = {
        "stdout": stdout.read().decode(),
        "stderr": stderr.read().decode(),
        "status": stdout.channel.recv_exit_status(),
    }

    chan = client.get_transport().open_session()
    chan.get_pty(term="xterm", width=100, height=30)
    chan.invoke_shell()
    chan.sendall(b"echo TERM=$TERM; tty; stty size; exit 4\n")
    result["pty"] = {"output": read_all(chan).decode(errors="replace"), "status": chan.recv_exit_status()}

    sftp = client.open_sftp()
    sftp.put(upload_src, "/root/paramiko.bin")
    sftp.get("/root/paramiko.bin", download_dst)
    sftp.close()
    client.close()
    print(json.dumps(result))


main()
