//! Key material as a type: zeroized on drop, redacted in `Debug`, no `Display`, no
//! `Serialize`; the bytes are reachable only through [`Secret::expose`].
//!
//! ```
//! use ovl::keys::SaKey;
//! let key = SaKey::generate().unwrap();
//! assert_eq!(format!("{key:?}"), "<SECRET>");
//! ```

pub mod schedule;

use zeroize::Zeroize;

/// Bytes of an `rfc4106(gcm(aes))` key: 32 bytes of AES-256 key and 4 bytes of salt.
pub const SA_KEY_LEN: usize = 36;
/// The AEAD the kernel is asked for.
pub const SA_AEAD_NAME: &str = "rfc4106(gcm(aes))";
/// ICV length in bits.
pub const SA_ICV_BITS: u32 = 128;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret<const N: usize>([u8; N]);

impl<const N: usize> Secret<N> {
    pub fn from_bytes(bytes: [u8; N]) -> Self {
        Secret(bytes)
    }
    /// Fresh key material from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        use ring::rand::SecureRandom as _;
        let mut bytes = [0u8; N];
        ring::rand::SystemRandom::new().fill(&mut bytes)?;
        Ok(Secret(bytes))
    }
    /// The raw bytes, for the one place that hands them to the kernel or the wire.
    pub fn expose(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> Drop for Secret<N> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<const N: usize> std::fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<SECRET>")
    }
}

/// Key and salt of one SA.
pub type SaKey = Secret<SA_KEY_LEN>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_keys_are_fresh() {
        let a = SaKey::generate().unwrap();
        let b = SaKey::generate().unwrap();
        assert_eq!(format!("{a:?}"), "<SECRET>");
        assert_ne!(a.expose(), b.expose());
        let bytes = *a.expose();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!format!("{a:?} {:?}", Some(&a)).contains(&hex));
    }
}
