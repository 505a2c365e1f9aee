//! The optional cluster CA (proto/certs.md): certificates that bind a node
//! name and the address ranges it may publish to its Ed25519 signing key,
//! the CA and certificate files, the blocklist, and the judgement of a
//! gossip record against them ([`Trust::judge`]).
//!
//! Everything here is pure: verification takes `now` (seconds since the
//! epoch) as a parameter, so expiry is tested without a clock.

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::gossip::members::valid_name;
use crate::identity::{fingerprint, SigningKey, SigningPublicKey};

/// Domain label that starts the bytes a CA signs (22 bytes, no terminator).
pub const CERT_LABEL: &[u8; 22] = b"meshsec v1 certificate";
/// The only certificate version.
pub const CERT_VERSION: u8 = 1;
/// Most address ranges one certificate holds.
pub const MAX_RANGES: usize = 16;
/// Longest encoded certificate: every field at its maximum.
pub const MAX_CERT_LEN: usize = 1 + 8 + 1 + 63 + 32 + 1 + MAX_RANGES * 18 + 8 + 8 + 64;
/// Longest certificate text accepted from gossip (base64 of [`MAX_CERT_LEN`]).
pub const MAX_CERT_TEXT: usize = MAX_CERT_LEN.div_ceil(3) * 4;
/// Longest certificate validity `meshsec ca sign` issues, in days.
pub const MAX_VALID_DAYS: u64 = 3650;
/// How long before its expiry the agent warns about its own certificate.
pub const EXPIRY_WARNING_SECS: u64 = 30 * 86_400;

/// An address range: an address with its host bits zero, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    /// The network address (host bits zero).
    pub addr: IpAddr,
    /// Prefix length (0-32 for IPv4, 0-128 for IPv6).
    pub prefix: u8,
}

impl Range {
    fn max_prefix(addr: &IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    fn mask(addr: &IpAddr, prefix: u8) -> u128 {
        let bits = u32::from(Self::max_prefix(addr));
        let prefix = u32::from(prefix);
        if prefix == 0 {
            0
        } else {
            (u128::MAX << (128 - prefix)) >> (128 - bits)
        }
    }

    fn bits(addr: &IpAddr) -> u128 {
        match addr {
            IpAddr::V4(a) => u128::from(u32::from(*a)),
            IpAddr::V6(a) => u128::from(*a),
        }
    }

    /// A range, if `prefix` fits the family and the host bits are zero.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Range> {
        (prefix <= Self::max_prefix(&addr) && Self::bits(&addr) & !Self::mask(&addr, prefix) == 0)
            .then_some(Range { addr, prefix })
    }

    /// Whether `ip` lies in this range (never across families).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.addr.is_ipv4() == ip.is_ipv4()
            && Self::bits(ip) & Self::mask(ip, self.prefix) == Self::bits(&self.addr)
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Range {
    type Err = String;
    /// `ADDR/PREFIX`, or a bare address (a single host).
    fn from_str(s: &str) -> Result<Range, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not ADDR/PREFIX"))?;
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| format!("{s:?}: prefix is not a number"))?,
            None => Range::max_prefix(&addr),
        };
        if prefix > Range::max_prefix(&addr) {
            return Err(format!("{s:?}: prefix longer than the address"));
        }
        Range::new(addr, prefix).ok_or_else(|| {
            format!("{s:?}: host bits are set (the network is {})", {
                let net = Range::bits(&addr) & Range::mask(&addr, prefix);
                match addr {
                    IpAddr::V4(_) => IpAddr::V4((net as u32).into()),
                    IpAddr::V6(_) => IpAddr::V6(net.into()),
                }
            })
        })
    }
}

/// The id of a CA key in certificates: the first 8 bytes of its SHA-256.
pub fn key_id(ca: &SigningPublicKey) -> [u8; 8] {
    let d = Sha256::digest(ca.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// A CA key id as text (16 hex digits).
pub fn key_id_text(id: &[u8; 8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate (proto/certs.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// [`key_id`] of the CA that signed it.
    pub ca_key_id: [u8; 8],
    /// The node name it is issued to.
    pub name: String,
    /// The node's Ed25519 signing key (the key its gossip records are signed with).
    pub node_key: SigningPublicKey,
    /// The address ranges the node may publish.
    pub ranges: Vec<Range>,
    /// Valid from (seconds since the epoch, inclusive).
    pub not_before: u64,
    /// Valid until (seconds since the epoch, exclusive).
    pub not_after: u64,
    /// The CA's Ed25519 signature over [`CERT_LABEL`] and everything before it.
    pub signature: [u8; 64],
}

/// Why bytes are not a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_CERT_LEN`] or [`MAX_CERT_TEXT`].
    #[error("too long")]
    TooLong,
    /// Not base64.
    #[error("not base64")]
    NotBase64,
    /// Ends before its last field.
    #[error("truncated")]
    Truncated,
    /// Bytes after the signature.
    #[error("trailing bytes after the signature")]
    Trailing,
    /// A version other than 1.
    #[error("unknown version")]
    Version,
    /// The name breaks the node name rule.
    #[error("invalid node name")]
    Name,
    /// No ranges, more than [`MAX_RANGES`], an unknown family, a prefix too
    /// long or host bits set.
    #[error("invalid address range")]
    Range,
    /// `not_after` is not after `not_before`.
    #[error("validity ends before it starts")]
    Validity,
}

/// Why a certificate does not vouch for a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// A CA is configured and the record carries no certificate.
    NoCert,
    /// The certificate does not decode.
    MalformedCert,
    /// Signed by no trusted CA.
    UnknownCa,
    /// The CA's signature does not verify (tampered, or forged).
    BadCertSignature,
    /// Not valid yet.
    NotYetValid,
    /// Expired.
    Expired,
    /// Issued to another name.
    NameMismatch,
    /// Issued to another signing key.
    KeyMismatch,
    /// A published data address lies outside the certificate's ranges.
    AddressNotCovered,
    /// The certificate or the signing key is on the blocklist.
    Blocklisted,
}

impl Refusal {
    /// Stable name, for logs, status and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::NoCert => "no_cert",
            Refusal::MalformedCert => "malformed_cert",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::BadCertSignature => "bad_cert_signature",
            Refusal::NotYetValid => "cert_not_yet_valid",
            Refusal::Expired => "cert_expired",
            Refusal::NameMismatch => "cert_name_mismatch",
            Refusal::KeyMismatch => "cert_key_mismatch",
            Refusal::AddressNotCovered => "address_not_covered",
            Refusal::Blocklisted => "blocklisted",
        }
    }

    /// Every reason, for metrics.
    pub const ALL: [Refusal; 10] = [
        Refusal::NoCert,
        Refusal::MalformedCert,
        Refusal::UnknownCa,
        Refusal::BadCertSignature,
        Refusal::NotYetValid,
        Refusal::Expired,
        Refusal::NameMismatch,
        Refusal::KeyMismatch,
        Refusal::AddressNotCovered,
        Refusal::Blocklisted,
    ];
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| DecodeError::Truncated)?;
        Ok(u64::from_be_bytes(b))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Truncated)
    }
}

impl Certificate {
    /// The bytes before the signature.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_CERT_LEN);
        out.push(CERT_VERSION);
        out.extend_from_slice(&self.ca_key_id);
        // A name is at most 63 bytes and ranges at most 16 (checked on decode and issue).
        out.push(self.name.len() as u8);
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(self.node_key.as_bytes());
        out.push(self.ranges.len() as u8);
        for r in &self.ranges {
            match r.addr {
                IpAddr::V4(a) => {
                    out.push(4);
                    out.extend_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    out.push(6);
                    out.extend_from_slice(&a.octets());
                }
            }
            out.push(r.prefix);
        }
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out
    }

    /// What the CA signs: [`CERT_LABEL`] then the body.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut m = CERT_LABEL.to_vec();
        m.extend_from_slice(&self.body());
        m
    }

    /// The encoded certificate: body then signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.signature);
        out
    }

    /// The certificate as text (base64, standard alphabet, padded): the
    /// certificate file's content and the gossip value.
    pub fn to_text(&self) -> String {
        B64.encode(self.encode())
    }

    /// Issues a certificate signed by `ca`.
    pub fn issue(
        ca: &SigningKey,
        name: &str,
        node_key: SigningPublicKey,
        ranges: Vec<Range>,
        not_before: u64,
        not_after: u64,
    ) -> Result<Certificate, DecodeError> {
        if !valid_name(name) {
            return Err(DecodeError::Name);
        }
        if ranges.is_empty() || ranges.len() > MAX_RANGES {
            return Err(DecodeError::Range);
        }
        if not_after <= not_before {
            return Err(DecodeError::Validity);
        }
        let mut c = Certificate {
            ca_key_id: key_id(&ca.public()),
            name: name.to_string(),
            node_key,
            ranges,
            not_before,
            not_after,
            signature: [0; 64],
        };
        c.signature = ca.sign(&c.signed_bytes());
        Ok(c)
    }

    /// Decodes a certificate, strictly: every field checked, nothing after
    /// the signature. Does not verify the signature ([`Certificate::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Certificate, DecodeError> {
        if bytes.len() > MAX_CERT_LEN {
            return Err(DecodeError::TooLong);
        }
        let mut r = Reader(bytes);
        if r.u8()? != CERT_VERSION {
            return Err(DecodeError::Version);
        }
        let ca_key_id = r.array::<8>()?;
        let name_len = usize::from(r.u8()?);
        let name = std::str::from_utf8(r.take(name_len)?).map_err(|_| DecodeError::Name)?;
        if !valid_name(name) {
            return Err(DecodeError::Name);
        }
        let node_key = SigningPublicKey(r.array::<32>()?);
        let n = usize::from(r.u8()?);
        if n == 0 || n > MAX_RANGES {
            return Err(DecodeError::Range);
        }
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            let addr = match r.u8()? {
                4 => IpAddr::from(r.array::<4>()?),
                6 => IpAddr::from(r.array::<16>()?),
                _ => return Err(DecodeError::Range),
            };
            ranges.push(Range::new(addr, r.u8()?).ok_or(DecodeError::Range)?);
        }
        let not_before = r.u64()?;
        let not_after = r.u64()?;
        if not_after <= not_before {
            return Err(DecodeError::Validity);
        }
        let signature = r.array::<64>()?;
        if !r.0.is_empty() {
            return Err(DecodeError::Trailing);
        }
        Ok(Certificate {
            ca_key_id,
            name: name.to_string(),
            node_key,
            ranges,
            not_before,
            not_after,
            signature,
        })
    }

    /// Decodes the text form (base64; surrounding whitespace ignored).
    pub fn from_text(text: &str) -> Result<Certificate, DecodeError> {
        let text = text.trim();
        if text.len() > MAX_CERT_TEXT {
            return Err(DecodeError::TooLong);
        }
        let bytes = B64.decode(text).map_err(|_| DecodeError::NotBase64)?;
        Certificate::decode(&bytes)
    }

    /// The certificate's fingerprint (the form of the key fingerprints:
    /// the first 8 bytes of the SHA-256 of its encoding).
    pub fn fingerprint(&self) -> String {
        let d: [u8; 32] = Sha256::digest(self.encode()).into();
        fingerprint_of_digest(&d)
    }

    /// Checks the CA signature and the validity window at `now` (seconds
    /// since the epoch) against the trusted CA keys.
    pub fn verify(&self, cas: &[SigningPublicKey], now: u64) -> Result<(), Refusal> {
        self.verify_signature(cas)?;
        self.check_time(now)
    }

    /// Checks the CA signature alone (the costly part: callers may cache it).
    pub fn verify_signature(&self, cas: &[SigningPublicKey]) -> Result<(), Refusal> {
        let ca = cas
            .iter()
            .find(|k| key_id(k) == self.ca_key_id)
            .ok_or(Refusal::UnknownCa)?;
        if !ca.verify(&self.signed_bytes(), &self.signature) {
            return Err(Refusal::BadCertSignature);
        }
        Ok(())
    }

    /// The validity window alone.
    pub fn check_time(&self, now: u64) -> Result<(), Refusal> {
        if now < self.not_before {
            Err(Refusal::NotYetValid)
        } else if now >= self.not_after {
            Err(Refusal::Expired)
        } else {
            Ok(())
        }
    }

    /// Whether the certificate vouches for `name`, signed by `key`,
    /// publishing `addrs` (every one must lie in one of its ranges).
    pub fn check_record(
        &self,
        name: &str,
        key: &SigningPublicKey,
        addrs: &[IpAddr],
    ) -> Result<(), Refusal> {
        if self.name != name {
            return Err(Refusal::NameMismatch);
        }
        if self.node_key != *key {
            return Err(Refusal::KeyMismatch);
        }
        if !addrs
            .iter()
            .all(|a| self.ranges.iter().any(|r| r.contains(a)))
        {
            return Err(Refusal::AddressNotCovered);
        }
        Ok(())
    }
}

fn fingerprint_of_digest(d: &[u8; 32]) -> String {
    d[..8]
        .chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join(":")
}

/// A problem with a CA, certificate or blocklist file; the message names
/// the flag (or config key) and the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{flag}: {path}: {reason}")]
pub struct FileError {
    /// `--ca`, `--cert`, `--blocklist`, `--ca-key`, `--out`.
    pub flag: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

fn file_err(flag: &'static str, path: &Path, reason: impl Into<String>) -> FileError {
    FileError {
        flag,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The non-comment, non-blank lines of a text file, numbered from 1.
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// File name of the CA certificate written beside the CA key.
pub const CA_CERT_FILE: &str = "ca.crt";

/// Creates a CA: the signing key at `out` (0600) and its public half at
/// `ca.crt` in the same directory. Refuses to overwrite an existing key
/// unless `force`. Returns the path of `ca.crt`.
pub fn ca_init(out: &Path, force: bool) -> Result<(PathBuf, SigningPublicKey), FileError> {
    if out.exists() && !force {
        return Err(file_err(
            "--out",
            out,
            "already exists; refusing to overwrite a CA key (--force replaces it, and every certificate it signed stops being trusted once hosts drop the old ca.crt)",
        ));
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
    let key = SigningKey::from_seed(*seed);
    let public = key.public();
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let crt = dir.join(CA_CERT_FILE);
    let key_text = Zeroizing::new(format!("{}\n", B64.encode(seed.as_ref())));
    write_atomic(out, key_text.as_bytes()).map_err(|e| file_err("--out", out, e.to_string()))?;
    write_atomic(&crt, ca_cert_text(&public).as_bytes())
        .map_err(|e| file_err("--out", &crt, e.to_string()))?;
    Ok((crt, public))
}

/// The content of a `ca.crt` file.
pub fn ca_cert_text(public: &SigningPublicKey) -> String {
    format!(
        "# meshsec cluster CA, key id {}; copy to every host (--ca)\n{}\n",
        key_id_text(&key_id(public)),
        B64.encode(public.as_bytes())
    )
}

/// Writes a file (0600) atomically beside its final path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    crate::identity::write_owner_only(path, &tmp, bytes)
}

/// Reads a CA signing key (`meshsec ca init`'s `ca.key`).
pub fn load_ca_key(path: &Path) -> Result<SigningKey, FileError> {
    let text = Zeroizing::new(
        fs::read_to_string(path).map_err(|e| file_err("--ca-key", path, e.to_string()))?,
    );
    let bytes = Zeroizing::new(B64.decode(text.trim()).map_err(|_| {
        file_err(
            "--ca-key",
            path,
            "not base64 (create one with `meshsec ca init`)",
        )
    })?);
    let seed: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| file_err("--ca-key", path, "not a 32-byte CA key"))?;
    Ok(SigningKey::from_seed(seed))
}

/// Reads a CA certificate file (`ca.crt`): one or more base64 CA public
/// keys, one per line; `#` starts a comment.
pub fn load_ca_file(path: &Path) -> Result<Vec<SigningPublicKey>, FileError> {
    let text = fs::read_to_string(path).map_err(|e| file_err("--ca", path, e.to_string()))?;
    let mut out = Vec::new();
    for (n, line) in content_lines(&text) {
        let key = crate::identity::decode_public(line).ok_or_else(|| {
            file_err(
                "--ca",
                path,
                format!("line {n}: not base64 of a 32-byte CA key"),
            )
        })?;
        if ed25519_dalek::VerifyingKey::from_bytes(&key).is_err() {
            return Err(file_err(
                "--ca",
                path,
                format!("line {n}: not an Ed25519 key"),
            ));
        }
        out.push(SigningPublicKey(key));
    }
    if out.is_empty() {
        return Err(file_err("--ca", path, "holds no CA key"));
    }
    Ok(out)
}

/// Reads every CA file.
pub fn load_cas(paths: &[PathBuf]) -> Result<Vec<SigningPublicKey>, FileError> {
    let mut out = Vec::new();
    for p in paths {
        out.extend(load_ca_file(p)?);
    }
    Ok(out)
}

/// Reads a certificate file (base64 on one line; `#` starts a comment).
pub fn load_cert_file(flag: &'static str, path: &Path) -> Result<Certificate, FileError> {
    let text = fs::read_to_string(path).map_err(|e| file_err(flag, path, e.to_string()))?;
    let mut lines = content_lines(&text);
    let Some((_, line)) = lines.next() else {
        return Err(file_err(flag, path, "holds no certificate"));
    };
    if lines.next().is_some() {
        return Err(file_err(flag, path, "holds more than one certificate"));
    }
    Certificate::from_text(line)
        .map_err(|e| file_err(flag, path, format!("not a certificate: {e}")))
}

/// Fingerprints whose certificates or signing keys are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blocklist(pub BTreeSet<String>);

impl Blocklist {
    /// Parses a blocklist: one fingerprint a line (`xxxx:xxxx:xxxx:xxxx`,
    /// as `meshsec ca show` prints a certificate's and `meshsec status` a
    /// signing key's); `#` starts a comment, also after a fingerprint.
    pub fn parse(text: &str) -> Result<Blocklist, String> {
        let mut out = BTreeSet::new();
        for (n, line) in content_lines(text) {
            let fp = line
                .split('#')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            let ok = fp.len() == 19
                && fp.split(':').count() == 4
                && fp
                    .split(':')
                    .all(|g| g.len() == 4 && g.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(format!(
                    "line {n}: {fp:?} is not a fingerprint (xxxx:xxxx:xxxx:xxxx)"
                ));
            }
            out.insert(fp);
        }
        Ok(Blocklist(out))
    }

    /// Reads a blocklist file.
    pub fn load(path: &Path) -> Result<Blocklist, FileError> {
        let text =
            fs::read_to_string(path).map_err(|e| file_err("--blocklist", path, e.to_string()))?;
        Blocklist::parse(&text).map_err(|r| file_err("--blocklist", path, r))
    }

    /// Whether the signing key or the certificate is listed.
    pub fn blocks(&self, key: &SigningPublicKey, cert: Option<&Certificate>) -> bool {
        self.0.contains(&key.fingerprint())
            || cert.is_some_and(|c| self.0.contains(&c.fingerprint()))
    }
}

/// What a record is judged against: the trusted CAs (none: no CA is
/// configured and certificates are not required) and the blocklist.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Trusted CA keys.
    pub cas: Vec<SigningPublicKey>,
    /// Refused fingerprints.
    pub blocklist: Blocklist,
}

impl Trust {
    /// Judges a validly signed record of `name`, signed by `key`, publishing
    /// `addrs`, carrying the certificate text `cert` (if any), at `now`.
    /// Returns the certificate that vouches for it (`None` when no CA is
    /// configured and none was needed).
    pub fn judge(
        &self,
        name: &str,
        key: &SigningPublicKey,
        addrs: &[IpAddr],
        cert: Option<&str>,
        now: u64,
    ) -> Result<Option<Certificate>, Refusal> {
        self.judge_with(name, key, addrs, cert, now, &mut |c| {
            c.verify_signature(&self.cas)
        })
    }

    /// [`Trust::judge`] with the signature check supplied (a cache of
    /// [`Certificate::verify_signature`] under these CAs).
    pub fn judge_with(
        &self,
        name: &str,
        key: &SigningPublicKey,
        addrs: &[IpAddr],
        cert: Option<&str>,
        now: u64,
        verify_signature: &mut dyn FnMut(&Certificate) -> Result<(), Refusal>,
    ) -> Result<Option<Certificate>, Refusal> {
        let parsed = cert.map(Certificate::from_text);
        // A listed certificate counts only on the record it was issued for:
        // pasted onto another member's record it must not evict that member
        // (found in review).
        let decoded = parsed
            .as_ref()
            .and_then(|p| p.as_ref().ok())
            .filter(|c| c.name == name && c.node_key == *key);
        if self.blocklist.blocks(key, decoded) {
            return Err(Refusal::Blocklisted);
        }
        if self.cas.is_empty() {
            return Ok(None);
        }
        let c = match parsed {
            None => return Err(Refusal::NoCert),
            Some(Err(_)) => return Err(Refusal::MalformedCert),
            Some(Ok(c)) => c,
        };
        verify_signature(&c)?;
        c.check_time(now)?;
        c.check_record(name, key, addrs)?;
        Ok(Some(c))
    }
}

/// Own certificate facts for `meshsec status` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// The certificate's fingerprint.
    pub fingerprint: String,
    /// The CA key id that signed it.
    pub ca_key_id: String,
    /// Its ranges.
    pub ranges: Vec<String>,
    /// Valid from, seconds since the epoch.
    pub not_before: u64,
    /// Valid until, seconds since the epoch.
    pub not_after: u64,
}

impl From<&Certificate> for CertInfo {
    fn from(c: &Certificate) -> CertInfo {
        CertInfo {
            fingerprint: c.fingerprint(),
            ca_key_id: key_id_text(&c.ca_key_id),
            ranges: c.ranges.iter().map(|r| r.to_string()).collect(),
            not_before: c.not_before,
            not_after: c.not_after,
        }
    }
}

/// Own certificate check, at start and on reload: it must verify under a
/// trusted CA now and vouch for this node's name, key and addresses.
pub fn check_own(
    cert: &Certificate,
    cas: &[SigningPublicKey],
    name: &str,
    key: &SigningPublicKey,
    addrs: &[IpAddr],
    now: u64,
) -> Result<(), String> {
    cert.verify(cas, now)
        .and_then(|()| cert.check_record(name, key, addrs))
        .map_err(|r| match r {
            Refusal::UnknownCa => format!(
                "signed by CA {}, which no --ca file holds",
                key_id_text(&cert.ca_key_id)
            ),
            Refusal::Expired => format!("expired at {} (unix seconds)", cert.not_after),
            Refusal::NotYetValid => format!("not valid before {} (unix seconds)", cert.not_before),
            Refusal::NameMismatch => format!("issued to {:?}, this node is {name:?}", cert.name),
            Refusal::KeyMismatch => format!(
                "issued to signing key {}, this node's is {} (meshsec pubkey)",
                cert.node_key.fingerprint(),
                key.fingerprint()
            ),
            Refusal::AddressNotCovered => format!(
                "its ranges {} do not cover every data address ({})",
                cert.ranges
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            other => other.as_str().to_string(),
        })
}

/// A CA public key's fingerprint (same form as the others).
pub fn ca_fingerprint(ca: &SigningPublicKey) -> String {
    fingerprint(ca.as_bytes())
}

#[cfg(test)]
mod tests;
