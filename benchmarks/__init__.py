"""Benchmarks: pop3-gateway against Dovecot POP3 (direct on Maildir, and over imapc). Never run by pytest."""
