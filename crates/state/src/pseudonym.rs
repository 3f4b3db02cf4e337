//! Pseudonyms: user ids turned into keyed hashes (HMAC-SHA256 under a server secret).
//!
//! Raw user ids are never stored or logged by this crate: the ledger is keyed by
//! [`Pseudonym`]s, and their `Debug` / `Display` forms show only a short prefix.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::Sha256;

use crate::error::StateError;

type HmacSha256 = Hmac<Sha256>;

/// Domain separation: a pseudonym is HMAC(secret, DOMAIN || user id).
const DOMAIN: &[u8] = b"fairrank.pseudonym.v1\0";

/// The least secret length accepted (bytes): 256 bits, the output size of SHA-256.
pub const MIN_SECRET_BYTES: usize = 32;

/// How many hex digits of a pseudonym `Debug` and `Display` show.
const SHOWN_HEX_DIGITS: usize = 8;

/// The keyed hash of a user id: 32 bytes, stable for a given server secret.
///
/// `Debug` and `Display` show only the first 8 hex digits (enough to correlate log lines,
/// not enough to re-identify); [`Pseudonym::to_hex`] gives the full value for storage tools.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pseudonym([u8; 32]);

impl Pseudonym {
    /// Wraps raw pseudonym bytes (for example read back from a shared store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Pseudonym(bytes)
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// All 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, StateError> {
        let bytes = hex_decode(text.trim()).ok_or_else(|| StateError::InvalidArgument {
            field: "pseudonym",
            reason: "must be 64 hex digits".to_string(),
        })?;
        let array: [u8; 32] = bytes.try_into().map_err(|_| StateError::InvalidArgument {
            field: "pseudonym",
            reason: "must be 64 hex digits".to_string(),
        })?;
        Ok(Pseudonym(array))
    }

    /// The short prefix shown by `Debug` and `Display`.
    fn short(&self) -> String {
        let mut text = hex_encode(&self.0[..SHOWN_HEX_DIGITS / 2]);
        text.push('…');
        text
    }
}

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pseudonym({})", self.short())
    }
}

impl fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// The server secret that turns user ids into [`Pseudonym`]s.
///
/// Keep it stable across restarts and identical across replicas sharing a ledger: a new
/// secret gives every user a fresh (empty) budget. `Debug` never shows it.
#[derive(Clone)]
pub struct PseudonymKey {
    /// HMAC state with the key already absorbed; cloned per pseudonym.
    keyed: HmacSha256,
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey(<redacted>)")
    }
}

impl PseudonymKey {
    /// A key from secret bytes (at least [`MIN_SECRET_BYTES`]).
    pub fn new(secret: &[u8]) -> Result<Self, StateError> {
        Self::with_path(secret, PathBuf::new())
    }

    fn with_path(secret: &[u8], path: PathBuf) -> Result<Self, StateError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(StateError::PseudonymKey {
                path,
                reason: format!(
                    "the secret has {} bytes, at least {MIN_SECRET_BYTES} are required",
                    secret.len()
                ),
            });
        }
        let keyed =
            HmacSha256::new_from_slice(secret).map_err(|error| StateError::PseudonymKey {
                path,
                reason: error.to_string(),
            })?;
        Ok(Self { keyed })
    }

    /// A key from hex digits (at least 64 of them).
    pub fn from_hex(text: &str) -> Result<Self, StateError> {
        Self::parse_hex(text, PathBuf::new())
    }

    fn parse_hex(text: &str, path: PathBuf) -> Result<Self, StateError> {
        let secret = hex_decode(text.trim()).ok_or_else(|| StateError::PseudonymKey {
            path: path.clone(),
            reason: "the secret must be written as hex digits".to_string(),
        })?;
        Self::with_path(&secret, path)
    }

    /// A fresh random key from the operating system's generator, with its hex form (store it).
    pub fn generate() -> Result<(Self, String), StateError> {
        let mut secret = [0_u8; MIN_SECRET_BYTES];
        OsRng
            .try_fill_bytes(&mut secret)
            .map_err(|error| StateError::PseudonymKey {
                path: PathBuf::new(),
                reason: format!("the operating system's random generator failed: {error}"),
            })?;
        let hex = hex_encode(&secret);
        Ok((Self::new(&secret)?, hex))
    }

    /// Reads the key from `path` (hex digits), or creates the file with a fresh random key
    /// (permissions 0600 on Unix, written and fsynced before use) when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, StateError> {
        let failure = |reason: String| StateError::PseudonymKey {
            path: path.to_path_buf(),
            reason,
        };
        match fs::read_to_string(path) {
            Ok(text) => return Self::parse_hex(&text, path.to_path_buf()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(failure(format!("cannot read: {error}"))),
        }
        let (key, hex) = Self::generate()?;
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        match options.open(path) {
            Ok(mut file) => {
                file.write_all(hex.as_bytes())
                    .and_then(|()| file.write_all(b"\n"))
                    .and_then(|()| file.sync_all())
                    .map_err(|error| failure(format!("cannot write: {error}")))?;
                Ok(key)
            }
            // Another process created it first: use theirs.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(path)
                    .map_err(|error| failure(format!("cannot read: {error}")))?;
                Self::parse_hex(&text, path.to_path_buf())
            }
            Err(error) => Err(failure(format!("cannot create: {error}"))),
        }
    }

    /// The pseudonym of `user_id`: HMAC-SHA256(secret, "fairrank.pseudonym.v1\0" || user_id).
    pub fn pseudonym(&self, user_id: &str) -> Pseudonym {
        let mut mac = self.keyed.clone();
        mac.update(DOMAIN);
        mac.update(user_id.as_bytes());
        Pseudonym(mac.finalize().into_bytes().into())
    }
}

/// Lowercase hex of `bytes`.
fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Bytes of an even-length hex string, or `None` if it is not one.
fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let value = |digit: u8| char::from(digit).to_digit(16).map(|v| v as u8);
    digits
        .chunks_exact(2)
        .map(|pair| Some(value(pair[0])? << 4 | value(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PseudonymKey {
        PseudonymKey::new(&[7_u8; 32]).unwrap()
    }

    #[test]
    fn matches_the_hmac_sha256_definition() {
        // Independent computation through the hmac crate with the documented message layout.
        let mut mac = HmacSha256::new_from_slice(&[7_u8; 32]).unwrap();
        mac.update(b"fairrank.pseudonym.v1\0alice");
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(key().pseudonym("alice").as_bytes(), &expected);
    }

    #[test]
    fn is_stable_per_key_and_differs_across_users_and_keys() {
        let a = key().pseudonym("alice");
        assert_eq!(a, key().pseudonym("alice"));
        assert_ne!(a, key().pseudonym("bob"));
        let other = PseudonymKey::new(&[8_u8; 32]).unwrap();
        assert_ne!(a, other.pseudonym("alice"));
    }

    #[test]
    fn debug_and_display_show_only_a_short_prefix() {
        let p = key().pseudonym("alice");
        let full = p.to_hex();
        assert_eq!(full.len(), 64);
        assert_eq!(p.to_string(), format!("{}…", &full[..8]));
        assert_eq!(format!("{p:?}"), format!("Pseudonym({}…)", &full[..8]));
        assert!(!format!("{p:?}").contains("alice"));
        assert_eq!(format!("{:?}", key()), "PseudonymKey(<redacted>)");
        assert_eq!(Pseudonym::from_hex(&full).unwrap(), p);
        assert!(Pseudonym::from_hex("abc").is_err());
    }

    #[test]
    fn short_secrets_and_bad_hex_are_refused() {
        assert!(matches!(
            PseudonymKey::new(&[1_u8; 31]),
            Err(StateError::PseudonymKey { .. })
        ));
        assert!(PseudonymKey::from_hex("zz").is_err());
        assert!(PseudonymKey::from_hex(&"ab".repeat(31)).is_err());
        assert!(PseudonymKey::from_hex(&"ab".repeat(32)).is_ok());
    }

    #[test]
    fn load_or_create_persists_the_generated_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pseudonym.key");
        let first = PseudonymKey::load_or_create(&path).unwrap();
        let second = PseudonymKey::load_or_create(&path).unwrap();
        assert_eq!(first.pseudonym("u1"), second.pseudonym("u1"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::write(&path, "not hex").unwrap();
        let error = PseudonymKey::load_or_create(&path).unwrap_err();
        assert!(error.to_string().contains("pseudonym.key"), "{error}");
    }
}
