//! A node's static X25519 control-plane identity: created by `keygen`, stored as base64
//! in a file of mode 0600, refused when group or others can read it or another user
//! owns it.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::keys::Secret;
use crate::spec::PublicKey;

pub type PrivateKey = Secret<32>;

/// The Noise pattern of the control plane; its DH is the identity's curve.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_AESGCM_SHA256";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot generate a key pair: {0}")]
    Generate(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: refusing a key file readable or writable by group or others (mode {mode:o}); chmod 600 it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "{path}: refusing a key file owned by uid {owner}, not by this process's uid {me} (whoever owns it can change it)"
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path}: not a key file written by `ovl-controller keygen`")]
    Format { path: PathBuf },
    #[error("{path}: already exists; refusing to overwrite a node identity")]
    Exists { path: PathBuf },
}

pub struct Identity {
    pub private: PrivateKey,
    pub public: PublicKey,
}

impl Identity {
    pub fn generate() -> Result<Identity, IdentityError> {
        let params = NOISE_PARAMS
            .parse()
            .map_err(|e: snow::Error| IdentityError::Generate(e.to_string()))?;
        let kp = snow::Builder::new(params)
            .generate_keypair()
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let private: [u8; 32] = kp
            .private
            .as_slice()
            .try_into()
            .map_err(|_| IdentityError::Generate("unexpected private key length".into()))?;
        let public: [u8; 32] = kp
            .public
            .as_slice()
            .try_into()
            .map_err(|_| IdentityError::Generate("unexpected public key length".into()))?;
        let mut kp = kp;
        zeroize::Zeroize::zeroize(&mut kp.private);
        Ok(Identity {
            private: Secret::from_bytes(private),
            public: PublicKey(public),
        })
    }

    /// Writes the private key to a new file created with mode 0600 (never replaced).
    pub fn write(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    IdentityError::Exists {
                        path: path.to_owned(),
                    }
                } else {
                    io(e)
                }
            })?;
        let mut text = base64::engine::general_purpose::STANDARD.encode(self.private.expose());
        text.push('\n');
        let result = file
            .write_all(text.as_bytes())
            .and_then(|_| file.sync_all());
        zeroize::Zeroize::zeroize(&mut text);
        result.map_err(io)
    }

    /// Reads a key file, refusing one that group or others may read or write, or that
    /// another user owns. The checks look at the file that was opened (no window
    /// between checking a path and reading it).
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt as _;
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(IdentityError::Owner {
                path: path.to_owned(),
                owner: meta.uid(),
                me,
            });
        }
        // A key file is one line of base64: anything much longer is not one.
        let mut text = String::new();
        let read = std::io::Read::by_ref(&mut file)
            .take(1024)
            .read_to_string(&mut text)
            .map_err(io);
        if let Err(e) = read {
            zeroize::Zeroize::zeroize(&mut text);
            return Err(e);
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(text.trim());
        zeroize::Zeroize::zeroize(&mut text);
        let format = || IdentityError::Format {
            path: path.to_owned(),
        };
        let mut bytes = decoded.map_err(|_| format())?;
        let private: Result<[u8; 32], _> = bytes.as_slice().try_into();
        zeroize::Zeroize::zeroize(&mut bytes);
        let private = Secret::from_bytes(private.map_err(|_| format())?);
        let public = x25519_public(&private);
        Ok(Identity { private, public })
    }
}

/// The public half of an X25519 private key (scalar multiplication of the base point).
fn x25519_public(private: &PrivateKey) -> PublicKey {
    let point = curve25519_dalek::MontgomeryPoint::mul_base_clamped(*private.expose());
    PublicKey(point.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_key_is_0600_and_loads_to_same_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let id = Identity::generate().unwrap();
        id.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Identity::load(&path).unwrap();
        assert_eq!(back.public, id.public);
        assert!(matches!(id.write(&path), Err(IdentityError::Exists { .. })));
    }

    #[test]
    fn a_key_file_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: giving a file to another user needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        Identity::generate().unwrap().write(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = Identity::load(&path).err().unwrap();
        assert!(
            matches!(err, IdentityError::Owner { owner: 65534, .. }),
            "{err}"
        );
    }

    #[test]
    fn group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        Identity::generate().unwrap().write(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Identity::load(&path).err().unwrap();
        assert!(
            matches!(err, IdentityError::Permissions { mode: 0o640, .. }),
            "{err}"
        );
    }
}
