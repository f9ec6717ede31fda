//! TLS for dialing the coordinator, shared by the worker and the `recur` client.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::{Error, Result};

/// Client-side TLS from PEM files: the CA that signed the coordinator's certificate, optionally
/// a client certificate and key (mutual TLS), and the name to expect in the coordinator's
/// certificate when it differs from the URL's host.
pub fn client_tls(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    domain: Option<&str>,
) -> Result<ClientTlsConfig> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::Tls(format!("{}: {e}", p.display())));
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    Ok(config)
}
