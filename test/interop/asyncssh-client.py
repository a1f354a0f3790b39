"""Drives a vesh server with AsyncSSH for the interoperability suite.

Usage: asyncssh-client.py PORT USER KEYFILE KNOWN_HOSTS UPLOAD_SRC DOWNLOAD_DST
Prints one JSON object: the library version, the exec result, what the
terminal session printed and its exit status. The host key is checked
against KNOWN_HOSTS.
"""
import asyncio
import json
import sys
import warnings

# Debian's AsyncSSH imports ciphers that python3-cryptography flags as deprecated.
warnings.simplefilter("ignore")
import asyncssh  # noqa: E402


async def main():
    port, user, keyfile, known_hosts, upload_src, download_dst = sys.argv[1:7]
    async with asyncssh.connect("127.0.0.1", port=int(port), username=user, client_keys=[keyfile],
                                known_hosts=known_hosts, agent_path=None, config=[]) as conn:
        result = {"version": asyncssh.__version__}
        r = await conn.run("echo to-out; echo to-err >&2; exit 7")
        result["exec"] = {"stdout": r.stdout, "stderr": r.stderr, "status": r.exit_status}

        proc = await conn.create_process(term_type="xterm", term_size=(100, 30))
        proc.stdin.write("echo TERM=$TERM; tty; stty size; exit 4\n")
        output = await proc.stdout.read()
        await proc.wait()
        result["pty"] = {"output": output, "status": proc.exit_status}

        async with conn.start_sftp_client() as sftp:
            await sftp.put(upload_src, "/root/asyncssh.bin")
            await sftp.get("/root/asyncssh.bin", download_dst)
    print(json.dumps(result))


asyncio.run(main())
