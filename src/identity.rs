//! The node's long-term identity (static X25519 key pair for Noise, Ed25519
//! signing key for its gossip records) and the cluster secret files.
//!
//! Files holding secrets are created with mode 0600 and written atomically
//! (temporary file + rename), so a crash never leaves a half-written key.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// File name of the node key inside the state directory.
pub const NODE_KEY_FILE: &str = "node.key";
/// File name of the node's Ed25519 signing key inside the state directory.
pub const SIGNING_KEY_FILE: &str = "signing.key";

/// Errors about key material, each naming the file and the flag that points at it.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A secret file is missing, unreadable or malformed.
    #[error("--secret-file: {path}: {reason}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// `meshsec init` would overwrite an existing file.
    #[error("--out: {0} already exists; refusing to overwrite a cluster secret")]
    Exists(PathBuf),
    /// Writing a new secret failed.
    #[error("--out: cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The state directory or node key cannot be used.
    #[error("--state-dir: {path}: {reason}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
}

/// A 32-byte cluster secret. Zeroed on drop.
#[derive(Clone)]
pub struct ClusterSecret(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Creates a new cluster secret file (32 random bytes, base64, mode 0600).
/// Refuses to overwrite; creates nothing on failure.
pub fn init_secret(out: &Path) -> Result<(), IdentityError> {
    if out.exists() {
        return Err(IdentityError::Exists(out.to_path_buf()));
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    let text = Zeroizing::new(format!("{}\n", B64.encode(bytes.as_ref())));
    let werr = |e: std::io::Error| IdentityError::Write {
        path: out.to_path_buf(),
        reason: e.to_string(),
    };
    // create_new: a racing writer loses instead of being overwritten.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists(out.to_path_buf())
            } else {
                werr(e)
            }
        })?;
    if let Err(e) = f.write_all(text.as_bytes()).and_then(|_| f.sync_all()) {
        let _ = fs::remove_file(out);
        return Err(werr(e));
    }
    Ok(())
}

/// Reads a cluster secret file: base64 of exactly 32 bytes.
pub fn load_secret(path: &Path) -> Result<ClusterSecret, IdentityError> {
    let mut secrets = load_secrets(path)?;
    if secrets.len() > 1 {
        return Err(IdentityError::Secret {
            path: path.to_path_buf(),
            reason: format!("holds {} secrets, one expected", secrets.len()),
        });
    }
    Ok(secrets.remove(0))
}

/// Loads a secret file: one base64 secret per line, the first sealing, so
/// that one file can hold a keyring during a rotation. Blank lines and lines
/// starting with `#` are skipped; a file without any secret is an error.
pub fn load_secrets(path: &Path) -> Result<Vec<ClusterSecret>, IdentityError> {
    let err = |reason: String| IdentityError::Secret {
        path: path.to_path_buf(),
        reason,
    };
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    warn_if_readable_by_others(path);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |r: &str| err(format!("line {}: {r}", n + 1));
        let decoded = Zeroizing::new(
            B64.decode(line)
                .map_err(|_| at("not base64 (create one with `meshsec init`)"))?,
        );
        let bytes: [u8; 32] = decoded.as_slice().try_into().map_err(|_| {
            at(&format!(
                "holds {} bytes, a cluster secret is 32",
                decoded.len()
            ))
        })?;
        out.push(ClusterSecret(Zeroizing::new(bytes)));
    }
    if out.is_empty() {
        return Err(err(
            "holds no secret (create one with `meshsec init`)".into()
        ));
    }
    Ok(out)
}

/// Loads every secret of a keyring: the files in order, each file's secrets
/// in order (the first seals).
pub fn load_keyring(paths: &[PathBuf]) -> Result<Vec<ClusterSecret>, IdentityError> {
    let mut out = Vec::new();
    for p in paths {
        out.extend(load_secrets(p)?);
    }
    Ok(out)
}

/// A secret file (cluster secret or node key) that users other than its
/// owner can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadableByOthers {
    /// The file.
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
}

impl std::fmt::Display for ReadableByOthers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is readable by its group or by everyone (mode {:04o}); fix: chmod 600 {}",
            self.path.display(),
            self.mode,
            self.path.display()
        )
    }
}

/// Which of `paths` their group or everyone may read. A file whose metadata
/// cannot be read is skipped: reading it reports the problem.
pub fn readable_by_others<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<ReadableByOthers> {
    paths
        .into_iter()
        .filter_map(|p| {
            let mode = fs::metadata(p).ok()?.permissions().mode() & 0o7777;
            (mode & 0o044 != 0).then(|| ReadableByOthers {
                path: p.to_path_buf(),
                mode,
            })
        })
        .collect()
}

/// Warns (does not refuse) when a secret file just loaded is readable by others.
fn warn_if_readable_by_others(path: &Path) {
    for finding in readable_by_others([path]) {
        tracing::warn!(file = %finding.path.display(), mode = format_args!("{:04o}", finding.mode), "{finding}");
    }
}

/// The node's static X25519 key pair.
#[derive(Clone)]
pub struct NodeKey {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", fingerprint(&self.public))
    }
}

/// Whether a node key was found on disk or freshly generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Read from the state directory.
    Loaded,
    /// Generated now; not yet on disk until [`NodeKey::persist`].
    Generated,
}

impl NodeKey {
    /// Builds a key pair from a private key.
    pub fn from_private(private: [u8; 32]) -> NodeKey {
        let secret = x25519_dalek::StaticSecret::from(private);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        NodeKey {
            private: Zeroizing::new(secret.to_bytes()),
            public,
        }
    }

    /// A fresh random key pair.
    pub fn generate() -> NodeKey {
        let mut private = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut private);
        NodeKey::from_private(private)
    }

    /// The public half.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// The private half.
    pub fn private(&self) -> &[u8; 32] {
        &self.private
    }

    /// Loads the node key from `state_dir`, or generates one without writing
    /// anything. The directory is checked for writability (not created), so a
    /// start that would fail later to persist the key fails here instead.
    pub fn load_or_generate(state_dir: &Path) -> Result<(NodeKey, KeyOrigin), IdentityError> {
        let (private, origin) = load_or_generate_private(state_dir, NODE_KEY_FILE)?;
        Ok((NodeKey::from_private(*private), origin))
    }

    /// Loads the node key; an absent key is an error (used by `meshsec pubkey`).
    pub fn load(state_dir: &Path) -> Result<NodeKey, IdentityError> {
        Ok(NodeKey::from_private(*load_private(
            state_dir,
            NODE_KEY_FILE,
        )?))
    }

    /// Writes the key to `state_dir/node.key` (0600) atomically.
    pub fn persist(&self, state_dir: &Path) -> Result<(), IdentityError> {
        persist_private(state_dir, NODE_KEY_FILE, &self.private)
    }
}

/// The node's long-term Ed25519 signing key: it signs the node's gossip
/// record (proto/records.md). Kept in `state_dir/signing.key` exactly like
/// the node key (base64 of the 32-byte seed, 0600, written atomically, only
/// once start-up succeeded).
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public().fingerprint())
    }
}

impl SigningKey {
    /// Builds a signing key from its 32-byte seed (RFC 8032 private key).
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        SigningKey {
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    /// The public half.
    pub fn public(&self) -> SigningPublicKey {
        SigningPublicKey(self.key.verifying_key().to_bytes())
    }

    /// Signs `message` (Ed25519, RFC 8032, deterministic).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.key.sign(message).to_bytes()
    }

    /// Loads the signing key from `state_dir`, or generates one without
    /// writing anything (see [`NodeKey::load_or_generate`]).
    pub fn load_or_generate(state_dir: &Path) -> Result<(SigningKey, KeyOrigin), IdentityError> {
        let (seed, origin) = load_or_generate_private(state_dir, SIGNING_KEY_FILE)?;
        Ok((SigningKey::from_seed(*seed), origin))
    }

    /// Loads the signing key; an absent key is an error.
    pub fn load(state_dir: &Path) -> Result<SigningKey, IdentityError> {
        Ok(SigningKey::from_seed(*load_private(
            state_dir,
            SIGNING_KEY_FILE,
        )?))
    }

    /// Writes the key to `state_dir/signing.key` (0600) atomically.
    pub fn persist(&self, state_dir: &Path) -> Result<(), IdentityError> {
        let seed = Zeroizing::new(self.key.to_bytes());
        persist_private(state_dir, SIGNING_KEY_FILE, &seed)
    }
}

/// A node's Ed25519 signing public key, as published in gossip (`sig_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SigningPublicKey(pub [u8; 32]);

impl SigningPublicKey {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Short fingerprint, same form as the node key's.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }

    /// Whether `signature` is a valid Ed25519 signature of `message` by this
    /// key (strict verification: no small-order keys, canonical `S`).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(message, &sig).is_ok()
    }
}

impl std::fmt::Display for SigningPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&encode_public(&self.0))
    }
}

/// Reads `state_dir/file`, or generates 32 random bytes without writing anything.
fn load_or_generate_private(
    state_dir: &Path,
    file: &str,
) -> Result<(Zeroizing<[u8; 32]>, KeyOrigin), IdentityError> {
    check_state_dir(state_dir)?;
    let path = state_dir.join(file);
    match read_key_file(&path) {
        Ok(key) => {
            warn_if_readable_by_others(&path);
            Ok((key, KeyOrigin::Loaded))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut fresh = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(fresh.as_mut());
            Ok((fresh, KeyOrigin::Generated))
        }
        Err(e) => Err(IdentityError::State {
            path,
            reason: e.to_string(),
        }),
    }
}

/// Reads `state_dir/file`; an absent file is an error naming who creates it.
fn load_private(state_dir: &Path, file: &str) -> Result<Zeroizing<[u8; 32]>, IdentityError> {
    let path = state_dir.join(file);
    read_key_file(&path).map_err(|e| {
        let reason = if e.kind() == std::io::ErrorKind::NotFound {
            "no node key yet (it is created when the agent first starts)".to_string()
        } else {
            e.to_string()
        };
        IdentityError::State { path, reason }
    })
}

/// Writes 32 secret bytes as base64 to `state_dir/file` (0600) atomically.
fn persist_private(state_dir: &Path, file: &str, private: &[u8; 32]) -> Result<(), IdentityError> {
    let path = state_dir.join(file);
    let tmp = state_dir.join(format!(".{file}.tmp{}", std::process::id()));
    let serr = |e: std::io::Error| IdentityError::State {
        path: path.clone(),
        reason: e.to_string(),
    };
    let text = Zeroizing::new(format!("{}\n", B64.encode(private)));
    create_state_dir(state_dir)
        .and_then(|()| write_owner_only(&path, &tmp, text.as_bytes()))
        .map_err(serr)
}

/// Writes `bytes` to `path` owner-only (0600), atomically: through `tmp`
/// (removed on failure), synced, then renamed over `path`.
pub fn write_owner_only(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // The temporary file is created, never reused: a stale one (or a symlink
    // somebody planted under its predictable name) is removed first, and a
    // new one is opened with O_EXCL and O_NOFOLLOW, so the key cannot land in
    // a file another user chose (found in review).
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(tmp)
    };
    let result = (|| {
        let mut f = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                fs::remove_file(tmp)?;
                open()?
            }
            r => r?,
        };
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

fn read_key_file(path: &Path) -> std::io::Result<Zeroizing<[u8; 32]>> {
    let text = Zeroizing::new(fs::read_to_string(path)?);
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let bytes = Zeroizing::new(
        B64.decode(text.trim())
            .map_err(|_| invalid("key is not base64"))?,
    );
    let private: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| invalid("key is not 32 bytes"))?;
    Ok(Zeroizing::new(private))
}

/// Checks, without creating anything, that `dir` is (or can become) a
/// writable directory, so a start that would later fail to persist the key
/// fails before it binds sockets.
fn check_state_dir(dir: &Path) -> Result<(), IdentityError> {
    let serr = |reason: String| IdentityError::State {
        path: dir.to_path_buf(),
        reason,
    };
    let mut probe = dir;
    loop {
        if probe.exists() {
            if !probe.is_dir() {
                return Err(serr(format!("{} is not a directory", probe.display())));
            }
            let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
                .map_err(|_| serr("path contains a NUL byte".into()))?;
            // SAFETY: c is a valid NUL-terminated path.
            if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
                return Err(serr(format!(
                    "{} is not writable: {}",
                    probe.display(),
                    std::io::Error::last_os_error()
                )));
            }
            return Ok(());
        }
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p,
            _ => return Ok(()), // relative path whose first component is missing: cwd decides
        }
    }
}

/// Creates the state directory (0700) if missing.
fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A short, stable fingerprint of a public key: the first 8 bytes of its
/// SHA-256, as colon-separated hex pairs of bytes.
pub fn fingerprint(public: &[u8; 32]) -> String {
    let digest = Sha256::digest(public);
    digest[..8]
        .chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join(":")
}

/// Base64 text of a public key, as published in gossip.
pub fn encode_public(public: &[u8; 32]) -> String {
    B64.encode(public)
}

/// Parses a base64 public key from gossip.
pub fn decode_public(text: &str) -> Option<[u8; 32]> {
    B64.decode(text).ok()?.as_slice().try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_key_persists_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (k1, o1) = NodeKey::load_or_generate(&state).unwrap();
        assert_eq!(o1, KeyOrigin::Generated);
        assert!(
            !state.exists(),
            "generate must not create anything before persist"
        );
        k1.persist(&state).unwrap();
        let mode = fs::metadata(state.join(NODE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        let (k2, o2) = NodeKey::load_or_generate(&state).unwrap();
        assert_eq!(o2, KeyOrigin::Loaded);
        assert_eq!(k1.public(), k2.public());
        assert_eq!(NodeKey::load(&state).unwrap().public(), k1.public());
    }

    #[test]
    fn signing_key_persists_beside_the_node_key() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (s1, o1) = SigningKey::load_or_generate(&state).unwrap();
        assert_eq!(o1, KeyOrigin::Generated);
        assert!(!state.exists(), "generate must not write before persist");
        s1.persist(&state).unwrap();
        let mode = fs::metadata(state.join(SIGNING_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (s2, o2) = SigningKey::load_or_generate(&state).unwrap();
        assert_eq!(o2, KeyOrigin::Loaded);
        assert_eq!(s1.public(), s2.public());
        assert_eq!(SigningKey::load(&state).unwrap().public(), s1.public());
        let sig = s1.sign(b"m");
        assert!(s2.public().verify(b"m", &sig));
        assert!(!s2.public().verify(b"n", &sig));
    }

    #[test]
    fn signing_key_matches_rfc8032() {
        // RFC 8032 section 7.1, TEST 1 (empty message).
        let k = SigningKey::from_seed(hex32(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        let public = hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        assert_eq!(k.public().0, public);
        let sig = k.sign(b"");
        assert_eq!(
            sig[..32],
            hex32("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155")
        );
        assert!(k.public().verify(b"", &sig));
        assert!(!SigningPublicKey([0u8; 32]).verify(b"", &sig));
    }

    #[test]
    fn public_key_matches_x25519_derivation() {
        // RFC 7748 section 6.1 test vector (Alice).
        let private = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(NodeKey::from_private(private).public(), &public);
    }

    #[test]
    fn corrupt_node_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(NODE_KEY_FILE), "garbage").unwrap();
        let err = NodeKey::load_or_generate(dir.path()).unwrap_err();
        assert!(err.to_string().starts_with("--state-dir:"), "{err}");
    }

    #[test]
    fn unwritable_state_dir_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, "x").unwrap();
        let err = NodeKey::load_or_generate(&file.join("sub")).unwrap_err();
        assert!(err.to_string().starts_with("--state-dir:"), "{err}");
        let err = NodeKey::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no node key yet"), "{err}");
    }

    #[test]
    fn init_secret_refuses_to_overwrite_and_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s");
        init_secret(&out).unwrap();
        let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = fs::read(&out).unwrap();
        assert!(matches!(init_secret(&out), Err(IdentityError::Exists(_))));
        assert_eq!(fs::read(&out).unwrap(), before);
        let s = load_secret(&out).unwrap();
        assert_ne!(*s.0, [0u8; 32]);
    }

    #[test]
    fn malformed_secrets_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let e = load_secret(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with("--secret-file:") && e.contains("missing"),
            "{e}"
        );
        let short = dir.path().join("short");
        fs::write(&short, B64.encode([1u8; 16])).unwrap();
        assert!(load_secret(&short)
            .unwrap_err()
            .to_string()
            .contains("16 bytes"));
        let junk = dir.path().join("junk");
        fs::write(&junk, "%%%").unwrap();
        assert!(load_secret(&junk)
            .unwrap_err()
            .to_string()
            .contains("not base64"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nothing yet\n\n").unwrap();
        assert!(load_keyring(std::slice::from_ref(&empty))
            .unwrap_err()
            .to_string()
            .contains("holds no secret"));
    }

    #[test]
    fn a_secret_file_can_hold_a_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        init_secret(&a).unwrap();
        init_secret(&b).unwrap();
        let (ta, tb) = (
            std::fs::read_to_string(&a).unwrap(),
            std::fs::read_to_string(&b).unwrap(),
        );
        let ring = dir.path().join("ring");
        std::fs::write(
            &ring,
            format!("# rotating\n{}\n\n{}\n", tb.trim(), ta.trim()),
        )
        .unwrap();
        let got = load_keyring(std::slice::from_ref(&ring)).unwrap();
        let want = load_keyring(&[b.clone(), a.clone()]).unwrap();
        assert_eq!(got.len(), 2);
        assert!(
            got.iter().zip(&want).all(|(x, y)| *x.0 == *y.0),
            "file order is keyring order"
        );
        assert!(load_secret(&ring)
            .unwrap_err()
            .to_string()
            .contains("holds 2 secrets"));
        std::fs::write(&ring, format!("{}\nnot-base64\n", ta.trim())).unwrap();
        let e = load_keyring(&[ring]).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("not base64"), "{e}");
    }

    #[test]
    fn secret_files_readable_by_others_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            fs::write(&p, "x\n").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let private = at("private", 0o600);
        let world = at("world", 0o644);
        let group = at("group", 0o640);
        let owner_only_ro = at("ro", 0o400);
        let missing = dir.path().join("missing");
        let found = readable_by_others(
            [&private, &world, &group, &owner_only_ro, &missing].map(|p| p.as_path()),
        );
        assert_eq!(
            found,
            vec![
                ReadableByOthers {
                    path: world.clone(),
                    mode: 0o644
                },
                ReadableByOthers {
                    path: group.clone(),
                    mode: 0o640
                },
            ]
        );
        let text = found[0].to_string();
        assert!(
            text.contains(&format!("chmod 600 {}", world.display())),
            "{text}"
        );
        // Loading warns but does not refuse.
        fs::write(&world, format!("{}\n", B64.encode([7u8; 32]))).unwrap();
        assert_eq!(load_keyring(&[world]).unwrap().len(), 1);
    }

    #[test]
    fn fingerprint_is_stable() {
        let fp = fingerprint(&[0u8; 32]);
        assert_eq!(fp.len(), 19);
        assert_eq!(fp, fingerprint(&[0u8; 32]));
        assert_ne!(fp, fingerprint(&[1u8; 32]));
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
