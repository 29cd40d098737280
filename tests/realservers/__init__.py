"""Real servers and real clients for the test suite.

- `dovecot`: a private Dovecot (IMAP, IMAPS, POP3, POP3S on free loopback ports) that never reads /etc.
- `clients`: fetchmail, mpop, getmail6 and curl driven against any POP3 server.
- `corpus`: test messages as bytes.

Nothing here skips: a missing program raises `MissingProgram`, so the tests that need it fail.
"""

from tests.realservers.fs import MissingProgram

__all__ = ["MissingProgram"]
