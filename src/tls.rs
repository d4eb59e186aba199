//! TLS 1.3 and PSK authentication: the only module that imports rustls.
//!
//! The certificate the destination presents is ephemeral and authenticates nothing. Both peers prove they hold
//! the VolSync key file's secret with a keyed BLAKE3 MAC over their role and the TLS exporter of *this* session
//! (channel binding), as `proto/PROTOCOL.md` ("Authentication") explains: the key never crosses the wire, and a man
//! in the middle that terminates TLS sees two different exporters, so neither side's proof verifies.

use std::path::Path;
use std::sync::Arc;

use rand::RngCore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// TLS exporter label for the PSK proof. Frozen in protocol version 1.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-blockmover-psk-v1";
/// Key-derivation context of the proof key. Frozen in protocol version 1.
const PROOF_CONTEXT: &str = "blockmover v1 2026-11 psk proof";
/// The fewest hex digits a secret may have (VolSync's rule).
const MIN_SECRET_HEX: usize = 32;

/// Which end of a session this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The agent that reads the snapshot (TLS client).
    Source,
    /// The agent that writes the target (TLS server).
    Destination,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Source => b"source",
            Side::Destination => b"destination",
        }
    }

    /// The other end.
    pub fn peer(self) -> Side {
        match self {
            Side::Source => Side::Destination,
            Side::Destination => Side::Source,
        }
    }
}

/// A pre-shared key from a VolSync rsync-tls key file (`<identity>:<hex secret>`).
#[derive(Clone)]
pub struct Psk {
    identity: String,
    proof_key: [u8; 32],
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk({}:<redacted>)", self.identity)
    }
}

impl Psk {
    /// Reads and checks a key file, refusing one that group or others may read or write (like ssh with a
    /// private key): the key is the only secret of a sync. In a cluster, the entrypoints copy the mounted Secret
    /// to a private file first, since `fsGroup` makes Secret files group-readable (`container/common.sh`).
    pub fn load(path: &Path) -> Result<Psk> {
        use std::os::unix::fs::PermissionsExt;
        let open_err = |source| Error::Open {
            what: "key file",
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path)
            .map_err(open_err)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::Key {
                path: path.to_owned(),
                reason: format!(
                    "mode {:04o} lets group or others access the key; run `chmod 600 {}`",
                    mode & 0o7777,
                    path.display()
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(open_err)?;
        Psk::parse(&text).map_err(|reason| Error::Key {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses `<identity>:<hex secret>`; the reason on failure never quotes the secret.
    pub fn parse(text: &str) -> std::result::Result<Psk, String> {
        let line = text.trim();
        let (identity, secret) = line
            .split_once(':')
            .ok_or("expected <identity>:<hex secret>, found no ':'")?;
        if identity.is_empty() {
            return Err("the identity before ':' is empty".into());
        }
        if secret.len() < MIN_SECRET_HEX {
            return Err(format!(
                "the secret has {} hex digits, at least {MIN_SECRET_HEX} are required",
                secret.len()
            ));
        }
        let secret = hex::decode(secret)
            .map_err(|e| format!("the secret is not an even number of hex digits ({e})"))?;
        let mut material = Vec::with_capacity(identity.len() + 1 + secret.len());
        material.extend_from_slice(identity.as_bytes());
        material.push(0);
        material.extend_from_slice(&secret);
        Ok(Psk {
            identity: identity.to_owned(),
            proof_key: blake3::derive_key(PROOF_CONTEXT, &material),
        })
    }

    /// A fresh key file body in VolSync's format: `volsync:` and 128 hex digits.
    pub fn generate() -> String {
        let mut secret = [0u8; 64];
        rand::rng().fill_bytes(&mut secret);
        format!("volsync:{}\n", hex::encode(secret))
    }

    /// The identity before the ':'.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// This side's proof for the session with the given exporter value.
    pub fn proof(&self, side: Side, exporter: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.proof_key);
        h.update(side.label());
        h.update(exporter);
        *h.finalize().as_bytes()
    }

    /// Checks the peer's proof in constant time.
    pub fn verify(&self, peer: Side, exporter: &[u8; 32], proof: &[u8; 32]) -> bool {
        blake3::Hash::from(self.proof(peer, exporter)) == blake3::Hash::from(*proof)
    }
}

/// ring's TLS 1.3 suites with AES-128-GCM first (ring lists AES-256-GCM first): 10 AES rounds instead of 14 on
/// every byte of the volume, both ways, and 128-bit keys are what TLS 1.3 mandates and what most stacks prefer.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The destination's acceptor: TLS 1.3 only, an ephemeral self-signed certificate, no client certificate.
pub fn acceptor() -> Result<TlsAcceptor> {
    let certified = rcgen::generate_simple_self_signed(vec!["blockmover".to_owned()])
        .map_err(|e| Error::TlsSetup(format!("certificate generation: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::TlsSetup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .map_err(|e| Error::TlsSetup(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The source's connector: TLS 1.3 only; the server's certificate is not trusted, only its handshake signature
/// is checked; trust comes from the PSK proof.
pub fn connector() -> Result<TlsConnector> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::TlsSetup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PskBoundCert(provider)))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name the source asks for (the certificate is not checked against it).
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from("blockmover")
            .expect("static DNS name is valid")
            .to_owned(),
    )
}

/// The exporter value that binds a PSK proof to a TLS session.
pub fn exporter<S>(conn: &rustls::ConnectionCommon<S>) -> Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| Error::TlsSetup(format!("tls exporter: {e}")))
}

/// The exporter of an established client stream.
pub fn client_exporter<IO: AsyncRead + AsyncWrite + Unpin>(
    s: &tokio_rustls::client::TlsStream<IO>,
) -> Result<[u8; 32]> {
    exporter(s.get_ref().1)
}

/// The exporter of an established server stream.
pub fn server_exporter<IO: AsyncRead + AsyncWrite + Unpin>(
    s: &tokio_rustls::server::TlsStream<IO>,
) -> Result<[u8; 32]> {
    exporter(s.get_ref().1)
}

/// Accepts any certificate; verifies only that the server holds its key. Authentication is the PSK proof.
#[derive(Debug)]
struct PskBoundCert(Arc<CryptoProvider>);

impl ServerCertVerifier for PskBoundCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "volsync:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn key_file_format_is_checked_without_quoting_the_secret() {
        assert!(Psk::parse(KEY).is_ok());
        assert!(Psk::parse(&format!("{KEY}\n")).is_ok());
        let short = Psk::parse("volsync:abcd").expect_err("short");
        assert!(short.contains("at least 32"), "{short}");
        assert!(!short.contains("abcd"));
        assert!(Psk::parse("00112233445566778899aabbccddeeff").is_err());
        assert!(Psk::parse(":00112233445566778899aabbccddeeff").is_err());
        assert!(Psk::parse("volsync:00112233445566778899aabbccddeefg").is_err());
    }

    #[test]
    fn key_file_readable_by_group_or_others_is_refused_with_the_fix() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("psk.txt");
        std::fs::write(&path, KEY)?;
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606, 0o610] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            let err = Psk::load(&path).expect_err("an exposed key file");
            let text = err.to_string();
            assert!(
                text.contains(&format!("chmod 600 {}", path.display())),
                "{text}"
            );
            assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
            assert!(!text.contains("00112233"), "{text}");
            assert!(!text.contains('\n'));
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            Psk::load(&path)?;
        }
        Ok(())
    }

    #[test]
    fn generated_key_is_volsync_shaped_and_parses() {
        let k = Psk::generate();
        let hexpart = k.trim().strip_prefix("volsync:").expect("prefix");
        assert_eq!(hexpart.len(), 128);
        assert!(hexpart
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(Psk::parse(&k).is_ok());
        assert_ne!(Psk::generate(), k);
    }

    #[test]
    fn proofs_bind_key_role_and_session() {
        let a = Psk::parse(KEY).expect("key");
        let b =
            Psk::parse("volsync:ff112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
                .expect("key");
        let ex = [1u8; 32];
        let p = a.proof(Side::Source, &ex);
        assert!(a.verify(Side::Source, &ex, &p));
        assert!(!b.verify(Side::Source, &ex, &p), "other key");
        assert!(!a.verify(Side::Destination, &ex, &p), "reflected proof");
        assert!(!a.verify(Side::Source, &[2u8; 32], &p), "other session");
        let other_identity =
            Psk::parse("backup:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
                .expect("key");
        assert!(!other_identity.verify(Side::Source, &ex, &p));
    }
}
