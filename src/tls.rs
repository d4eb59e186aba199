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
/// The largest key file read (VolSync's is 136 bytes).
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

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
    ///
    /// Anything but a regular file (a directory, FIFO, socket, device) is refused before it is opened, so a FIFO
    /// never blocks the agent; the file is then opened non-blocking and checked again through its descriptor.
    pub fn load(path: &Path) -> Result<Psk> {
        use std::io::Read;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let open_err = |source| Error::Open {
            what: "key file",
            path: path.to_owned(),
            source,
        };
        let key_err = |reason: String| Error::Key {
            path: path.to_owned(),
            reason,
        };
        check_key_file(&std::fs::metadata(path).map_err(open_err)?).map_err(key_err)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32)
            .open(path)
            .map_err(open_err)?;
        // The path may have been swapped between the two looks: what counts is the file we read.
        let meta = file.metadata().map_err(open_err)?;
        check_key_file(&meta).map_err(key_err)?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(key_err(format!(
                "mode {:04o} lets group or others access the key; run `chmod 600 {}`",
                mode & 0o7777,
                path.display()
            )));
        }
        let mut bytes = Vec::new();
        file.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(open_err)?;
        if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
            return Err(key_err(format!(
                "larger than {MAX_KEY_FILE_BYTES} bytes: a key file is one line <identity>:<hex secret>"
            )));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| key_err("is not UTF-8 text: expected <identity>:<hex secret>".into()))?;
        Psk::parse(&text).map_err(key_err)
    }

    /// Parses `<identity>:<hex secret>` (a leading UTF-8 byte order mark and surrounding whitespace are ignored).
    /// The reason on failure never quotes the secret, nor any character of it: a bad character is named by its
    /// position only.
    pub fn parse(text: &str) -> std::result::Result<Psk, String> {
        let line = text.strip_prefix('\u{feff}').unwrap_or(text).trim();
        let (identity, secret) = line
            .split_once(':')
            .ok_or("expected <identity>:<hex secret>, found no ':'")?;
        if identity.is_empty() {
            return Err("the identity before ':' is empty".into());
        }
        if secret.contains(':') {
            return Err(
                "found more than one ':': the identity may not contain ':', and the secret after it is hex \
                 digits only (expected <identity>:<hex secret>)"
                    .into(),
            );
        }
        if secret.starts_with(char::is_whitespace) {
            return Err(
                "a space follows ':': write <identity>:<hex secret> with nothing between ':' and the secret".into(),
            );
        }
        if let Some(at) = secret.chars().position(|c| !c.is_ascii_hexdigit()) {
            return Err(format!(
                "character {} of the secret (counting from 1 after ':') is not a hex digit",
                at + 1
            ));
        }
        if secret.len() < MIN_SECRET_HEX {
            return Err(format!(
                "the secret has {} hex digits, at least {MIN_SECRET_HEX} are required",
                secret.len()
            ));
        }
        if secret.len() % 2 != 0 {
            return Err(format!(
                "the secret has an odd number of hex digits ({}): two digits make a byte",
                secret.len()
            ));
        }
        let secret = hex::decode(secret).map_err(|_| "the secret is not hex digits".to_owned())?;
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

/// Refuses anything but a regular file, naming what it is instead (no chmod advice: the mode is not the problem).
fn check_key_file(meta: &std::fs::Metadata) -> std::result::Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        return Ok(());
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "a special file"
    };
    Err(format!("the path is not a regular file but {kind}"))
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

    const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn key_file_format_is_checked_without_quoting_the_secret() {
        assert!(Psk::parse(KEY).is_ok());
        assert!(Psk::parse(&format!("{KEY}\n")).is_ok());
        let short = Psk::parse("volsync:abcd").expect_err("short");
        assert!(short.contains("at least 32"), "{short}");
        assert!(!short.contains("abcd"));
        assert!(Psk::parse("00112233445566778899aabbccddeeff").is_err());
        assert!(Psk::parse(":00112233445566778899aabbccddeeff").is_err());
        let odd = Psk::parse(&format!("volsync:{SECRET}0")).expect_err("odd");
        assert!(odd.contains("odd number of hex digits"), "{odd}");
    }

    #[test]
    fn each_common_key_file_mistake_has_its_own_message() {
        let colon = Psk::parse(&format!("vol:sync:{SECRET}")).expect_err("colon");
        assert!(colon.contains("identity may not contain ':'"), "{colon}");
        let space = Psk::parse(&format!("volsync: {SECRET}")).expect_err("space");
        assert!(space.contains("a space follows ':'"), "{space}");
        for (i, message) in [colon, space].iter().enumerate() {
            assert!(!message.contains("00112233"), "{i}: {message}");
            assert!(!message.contains("Odd number"), "{i}: {message}");
        }
    }

    #[test]
    fn a_non_hex_character_is_named_by_its_position_only() {
        // 'g' and 'z' are not hex: neither may appear in the message, nor any part of the secret.
        let bad = format!("volsync:{}g{}", &SECRET[..5], &SECRET[6..]);
        let err = Psk::parse(&bad).expect_err("non-hex");
        assert!(err.contains("character 6 of the secret"), "{err}");
        assert!(!err.contains("\"g\"") && !err.contains("'g'"), "{err}");
        assert!(!err.contains("00112"), "{err}");
        let unicode = Psk::parse(&format!("volsync:{}é{}", &SECRET[..9], &SECRET[10..]))
            .expect_err("non-hex");
        assert!(unicode.contains("character 10 of the secret"), "{unicode}");
        assert!(!unicode.contains('é'), "{unicode}");
    }

    #[test]
    fn a_byte_order_mark_is_ignored() -> anyhow::Result<()> {
        let with_bom = Psk::parse(&format!("\u{feff}{KEY}\r\n")).map_err(anyhow::Error::msg)?;
        assert_eq!(with_bom.identity(), "volsync");
        let plain = Psk::parse(KEY).map_err(anyhow::Error::msg)?;
        let ex = [7u8; 32];
        assert_eq!(
            with_bom.proof(Side::Source, &ex),
            plain.proof(Side::Source, &ex)
        );
        Ok(())
    }

    #[test]
    fn a_key_path_that_is_not_a_regular_file_is_refused_at_once() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let sub = dir.path().join("keydir");
        std::fs::create_dir(&sub)?;
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755))?;
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )?;
        for (path, kind) in [(&sub, "a directory"), (&fifo, "a FIFO")] {
            // A FIFO without a writer would block a plain open: this returns at once.
            let err = Psk::load(path).expect_err("not a regular file").to_string();
            assert!(err.contains("is not a regular file"), "{err}");
            assert!(err.contains(kind), "{err}");
            assert!(!err.contains("chmod"), "{err}");
        }
        Ok(())
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
