"""pop3-gateway: POP3 for clients that cannot change, onto IMAP, JMAP and Maildir upstreams."""

__version__ = "0.1.0"
