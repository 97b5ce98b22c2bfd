"""Keyless TLS on the edge: TLS 1.3 terminated here, the CertificateVerify signed by the
site's key server."""
