"""The key server: holds the site's private keys and signs TLS 1.3 CertificateVerify content
for authorised edges, and nothing else."""
