"""OAuth2 upstream credentials: SASL payloads (``sasl``), the token flows (``flows``), provider profiles
(``providers``) and tokens at rest (``vault``)."""
