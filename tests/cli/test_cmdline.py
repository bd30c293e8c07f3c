"""A mount's command line as other users see it (`ps`): http(s) URLs' queries and URLs'
passwords masked."""

import subprocess
import sys

from fuseclone.cmdline import masked_url_queries


def test_only_http_url_queries_are_masked_and_lengths_kept():
    area = b"fuseclone\0mount\0HTTPS://h/o?X-Amz-Signature=s3cr3t\0/a?b\0nbd://h/e?tls=1\0dst"
    masked = masked_url_queries(area)
    assert masked == (b"fuseclone\0mount\0HTTPS://h/o?" + b"*" * 22 + b"\0/a?b\0nbd://h/e?tls=1\0dst")
    assert len(masked) == len(area)
    joined = b"--mirror=https://m/o?sig=s3cr3t"  # an option's value after '='
    assert masked_url_queries(joined) == b"--mirror=https://m/o?" + b"*" * 10


def test_url_passwords_are_masked_and_lengths_kept():
    area = (b"mount\0http://u:pw@h/o\0--mirror=nbd://me:s3@h:10809/e\0/tmp/a:b@c\0"
            b"http://h:8080/a:b@c\0https://u:pw@h/o?sig=x")
    assert masked_url_queries(area) == (
        b"mount\0http://u:**@h/o\0--mirror=nbd://me:**@h:10809/e\0/tmp/a:b@c\0"
        b"http://h:8080/a:b@c\0https://u:**@h/o?*****")


def test_a_process_that_masks_shows_no_query_in_its_cmdline():
    code = ("import sys, time\nfrom fuseclone.cmdline import mask_url_queries\nmask_url_queries()\n"
            "print(sys.argv[1], flush=True)\ntime.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code, "http://h/o?sig=s3cr3t"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "http://h/o?sig=s3cr3t"  # its own copy intact
        cmdline = open(f"/proc/{child.pid}/cmdline", "rb").read()
        assert b"s3cr3t" not in cmdline and b"http://h/o?**********" in cmdline
    finally:
        child.kill()
        child.wait()
