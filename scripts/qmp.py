#!/usr/bin/env python3
"""A small QMP (QEMU Machine Protocol) client, standard library only.

scripts/bench-peers.sh drives its QEMU mirror peer (qemu-storage-daemon) with it.

  qmp.py SOCKET COMMAND [ARGUMENTS-JSON]   runs one command, prints its "return" as JSON
  qmp.py SOCKET wait-job JOB STATUS SECS   polls query-jobs until JOB has STATUS; fails at
                                           once if JOB ends up in a state it cannot leave
  qmp.py SOCKET wait-gone JOB SECS         polls query-jobs until JOB is no longer listed
  qmp.py SOCKET mirror-check JOB NODE COPY_MODE
                                           one line, REASON<TAB>BACKLOG: REASON is "ok" when
                                           JOB exists, is ready, the export is on NODE and,
                                           for COPY_MODE write-blocking, the job is actively
                                           synced (before QEMU 8.2, which does not say so: has
                                           nothing left to copy); BACKLOG is len - offset in
                                           bytes (what the mirror has still to copy), -1
                                           without a job
  qmp.py SOCKET wait-caught-up JOB SECS    polls query-block-jobs until JOB has nothing left
                                           to copy; prints the seconds it took, or fails

QMP_CONNECT_WAIT (seconds, default 0): how long to keep trying to connect (a daemon that is
starting); QMP_TIMEOUT (seconds, default 60): how long to wait for an answer. Exit status 1,
with the reason on stderr, on a QMP error, a closed connection or a timeout.
"""

import json
import os
import socket
import sys
import time

# Job states from which a job still gets to "ready" (QAPI JobStatus).
ON_THE_WAY = {"created", "running", "standby", "paused", "waiting"}


class QmpError(Exception):
    """A command failed, the connection closed, or an answer was not QMP."""


class Qmp:
    """One QMP connection, capabilities negotiated."""

    def __init__(self, path):
        deadline = time.monotonic() + float(os.environ.get("QMP_CONNECT_WAIT", "0"))
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError as e:
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError("cannot connect to %s: %s" % (path, e)) from e
                time.sleep(0.05)
        self.sock.settimeout(float(os.environ.get("QMP_TIMEOUT", "60")))
        self.file = self.sock.makefile("rwb", buffering=0)
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError("%s: not a QMP greeting: %s" % (path, greeting))
        self.execute("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise QmpError("the QMP connection closed")
        return json.loads(line)

    def execute(self, command, arguments=None):
        """Runs COMMAND and returns its "return" value; events that arrive meanwhile are skipped."""
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.file.write((json.dumps(msg) + "\n").encode())
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QmpError("%s: %s" % (command, reply["error"].get("desc", reply["error"])))
            return reply.get("return")

    def close(self):
        self.file.close()
        self.sock.close()


def job(q, job_id):
    """JOB's entry in query-jobs, or None."""
    return next((j for j in q.execute("query-jobs") if j["id"] == job_id), None)


def block_job(q, job_id):
    """JOB's entry in query-block-jobs, or None."""
    return next((j for j in q.execute("query-block-jobs") if j["device"] == job_id), None)


def wait_job(q, job_id, status, secs):
    deadline = time.monotonic() + secs
    while True:
        j = job(q, job_id)
        now = j["status"] if j else "missing"
        if now == status:
            return
        if now not in ON_THE_WAY:
            raise QmpError("job %s is %s%s, not %s" % (job_id, now, ": " + j["error"] if j and "error" in j else "", status))
        if time.monotonic() >= deadline:
            raise QmpError("job %s is still %s after %ss, not %s" % (job_id, now, secs, status))
        time.sleep(0.2)


def wait_gone(q, job_id, secs):
    deadline = time.monotonic() + secs
    while job(q, job_id) is not None:
        if time.monotonic() >= deadline:
            raise QmpError("job %s is still there after %ss" % (job_id, secs))
        time.sleep(0.1)


def mirror_check(q, job_id, node, copy_mode):
    """(reason, backlog): reason is "ok" when the mirror replicates what the export takes."""
    j = block_job(q, job_id)
    if j is None:
        return "mirror job %s is gone (the replica failed?)" % job_id, -1
    backlog = j["len"] - j["offset"]
    exports = [e["node-name"] for e in q.execute("query-block-exports")]
    if not j.get("ready"):
        return "mirror job %s is not ready (status %s)" % (job_id, j.get("status")), backlog
    if exports != [node]:
        return "the export is on %s, not on the mirror's filter %s" % (",".join(exports) or "no node", node), backlog
    if copy_mode == "write-blocking":
        # QEMU before 8.2 does not report actively-synced; in sync, nothing is left to copy.
        if "actively-synced" not in j and backlog != 0:
            return "mirror job %s has %d bytes to copy (no actively-synced here)" % (job_id, backlog), backlog
        if not j.get("actively-synced", True):
            return "mirror job %s is not actively synced" % job_id, backlog
    return "ok", backlog


def wait_caught_up(q, job_id, secs):
    t0 = time.monotonic()
    while True:
        j = block_job(q, job_id)
        if j is None:
            raise QmpError("mirror job %s is gone" % job_id)
        if j["len"] == j["offset"]:
            return time.monotonic() - t0
        if time.monotonic() - t0 >= secs:
            raise QmpError("mirror job %s still has %d bytes to copy after %ss" % (job_id, j["len"] - j["offset"], secs))
        time.sleep(0.1)


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    q = Qmp(argv[1])
    cmd, args = argv[2], argv[3:]
    if cmd == "wait-job" and len(args) == 3:
        wait_job(q, args[0], args[1], float(args[2]))
    elif cmd == "wait-gone" and len(args) == 2:
        wait_gone(q, args[0], float(args[1]))
    elif cmd == "mirror-check" and len(args) == 3:
        print("%s\t%d" % mirror_check(q, *args))
    elif cmd == "wait-caught-up" and len(args) == 2:
        print("%.2f" % wait_caught_up(q, args[0], float(args[1])))
    elif len(args) <= 1:
        print(json.dumps(q.execute(cmd, json.loads(args[0]) if args else None)))
    else:
        sys.exit(__doc__)
    q.close()


if __name__ == "__main__":
    try:
        main(sys.argv)
    except (QmpError, OSError, ValueError) as e:
        sys.exit("qmp: %s" % e)
