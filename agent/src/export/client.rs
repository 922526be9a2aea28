//! The HTTP client: hyper's pooled HTTP/1 client, plain or over TLS
//! (rustls), checking an https collector against the system's trust store
//! and, when given, a CA file of its own.

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer},
    RootCertStore,
};
use tracing::warn;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The certificates of a PEM file.
///
/// # Errors
/// The file cannot be read or holds no certificate.
pub fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect)
        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "CA file {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The client; `ca` (a CA file's certificates, `read_ca`) is added to the
/// system's. With no trust anchor at all (neither) it warns: plain
/// `http://` still works.
///
/// # Errors
/// A certificate of `ca` is refused.
pub fn build(ca: Option<&[CertificateDer<'static>]>) -> Result<HttpClient, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    if let Some(e) = native.errors.first() {
        warn!("some of the system's CA certificates could not be read: {e}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(certs) = ca {
        for cert in certs {
            roots
                .add(cert.clone())
                .map_err(|e| format!("export CA file: {e}"))?;
        }
    } else if added == 0 {
        warn!("no CA certificate in the system's trust store: an https collector cannot be checked (set export.ca_file)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
