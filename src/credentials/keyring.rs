//! Fernet key ring with MultiFernet semantics: the first key encrypts, every key decrypts.
//! Tokens are the standard Fernet format, so Python `cryptography.fernet` reads and writes them.

use base64::Engine;
use fernet::{Fernet, MultiFernet};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::CryptoConfig;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key {index} of the key ring is not a Fernet key")]
    BadKey { index: usize },
    #[error("the token cannot be decrypted with any key of the ring")]
    Undecryptable,
    #[error("decrypted data is not UTF-8")]
    NotUtf8,
}

pub struct KeyRing {
    multi: MultiFernet,
    /// The primary key alone, to tell whether a token is already under it (rotation).
    primary: Fernet,
    /// The primary key's bytes, only ever used as an HMAC key (see `derive`).
    primary_bytes: Vec<u8>,
    len: usize,
    ephemeral: bool,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.len)
            .field("ephemeral", &self.ephemeral)
            .finish()
    }
}

impl KeyRing {
    /// Builds the ring from configured keys (url-safe base64). Empty → one random key.
    pub fn from_config(cfg: &CryptoConfig) -> Result<Self, CryptoError> {
        let keys: Vec<String> = cfg
            .fernet_keys
            .iter()
            .map(|k| k.expose().trim().to_owned())
            .collect();
        if keys.is_empty() {
            return Ok(Self::ephemeral());
        }
        Self::from_keys(&keys)
    }

    pub fn from_keys<S: AsRef<str>>(keys: &[S]) -> Result<Self, CryptoError> {
        let fernets = keys
            .iter()
            .enumerate()
            .map(|(index, k)| Fernet::new(k.as_ref()).ok_or(CryptoError::BadKey { index }))
            .collect::<Result<Vec<_>, _>>()?;
        let primary = Fernet::new(keys[0].as_ref()).ok_or(CryptoError::BadKey { index: 0 })?;
        let primary_bytes = base64::engine::general_purpose::URL_SAFE
            .decode(keys[0].as_ref().trim())
            .map_err(|_| CryptoError::BadKey { index: 0 })?;
        Ok(Self {
            len: fernets.len(),
            multi: MultiFernet::new(fernets),
            primary,
            primary_bytes,
            ephemeral: false,
        })
    }

    /// A ring of one random key: data encrypted with it dies with the process.
    pub fn ephemeral() -> Self {
        let key = Fernet::generate_key();
        let mut ring = Self::from_keys(&[key]).unwrap_or_else(|_| unreachable!("generated key"));
        ring.ephemeral = true;
        ring
    }

    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    pub fn generate_key() -> String {
        Fernet::generate_key()
    }

    pub fn encrypt(&self, plaintext: &str) -> String {
        self.multi.encrypt(plaintext.as_bytes())
    }

    pub fn decrypt(&self, token: &str) -> Result<String, CryptoError> {
        let bytes = self
            .multi
            .decrypt(token)
            .map_err(|_| CryptoError::Undecryptable)?;
        String::from_utf8(bytes).map_err(|_| CryptoError::NotUtf8)
    }

    /// A key for `purpose` derived from the primary key (HMAC-SHA256), so other secrets need no
    /// configuration of their own and rotate with the ring. Never the Fernet key itself.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.primary_bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Whether `token` is already encrypted under the primary key (rotation can skip it).
    pub fn is_primary(&self, token: &str) -> bool {
        self.primary.decrypt(token).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_key_encrypts_every_key_decrypts() {
        let old = KeyRing::generate_key();
        let new = KeyRing::generate_key();
        let old_ring = KeyRing::from_keys(std::slice::from_ref(&old)).expect("ring");
        let token = old_ring.encrypt("s3cret");
        let rotated = KeyRing::from_keys(&[new, old]).expect("ring");
        assert_eq!(rotated.decrypt(&token).expect("decrypts"), "s3cret");
        assert!(!rotated.is_primary(&token));
        assert!(rotated.is_primary(&rotated.encrypt("x")));
    }

    #[test]
    fn bad_key_is_named() {
        let err = KeyRing::from_keys(&["not-a-key"]).expect_err("bad key");
        assert!(matches!(err, CryptoError::BadKey { index: 0 }));
    }

    #[test]
    fn foreign_token_is_rejected() {
        let a = KeyRing::ephemeral();
        let b = KeyRing::ephemeral();
        assert!(matches!(
            b.decrypt(&a.encrypt("x")),
            Err(CryptoError::Undecryptable)
        ));
    }
}
