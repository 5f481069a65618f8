"""Stage 4: planted secrets and personal data are replaced, consistently within a file."""

from codetune.data.redact import redact

AWS = "AKIAIOSFODNN7EXAMPLE"
GH = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"
PLANTED = f'''import boto3

AWS_ACCESS_KEY_ID = "{AWS}"
db_password = "correct-horse-battery-staple"
GITHUB_TOKEN = "{GH}"
# maintainer: Jane Doe <jane.doe@example.com>, server at 203.0.113.77 and 8.8.4.4
LOCAL = "127.0.0.1"
copy_of_key = "{AWS}"  # the same value again, on a line no detector flags
-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAx4UbaDzY8XHqN6GJ0fdqDhrY6ZCxzw0k
-----END RSA PRIVATE KEY-----
'''


def test_planted_secrets_are_redacted():
    out, counts = redact(PLANTED)
    for secret in (AWS, GH, "correct-horse-battery-staple", "jane.doe@example.com", "8.8.4.4", "MIIEowIBAAKCAQEA"):
        assert secret not in out, secret
    assert 'AWS_ACCESS_KEY_ID = "<KEY>"' in out and 'copy_of_key = "<KEY>"' in out
    assert 'db_password = "<PASSWORD>"' in out
    assert "<EMAIL>" in out and "<IP_ADDRESS>" in out
    assert "127.0.0.1" in out  # loopback is not personal data
    assert counts["<EMAIL>"] == 1 and counts["<KEY>"] >= 3


def test_ordinary_code_is_untouched():
    code = "def tokenize(text, key=None):\n    return sorted(text.split(), key=key)\n\nversion = '1.2.3.4'\n"
    assert redact(code)[0] == code
