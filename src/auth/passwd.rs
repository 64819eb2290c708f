//! Password files in Mosquitto's format: one `user:hash` per line, `#` lines and blank
//! lines ignored.
//!
//! Hashes read:
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 of the password with the salt,
//!   64 bytes (what `mosquitto_passwd` 2.0 writes; its default is 101 iterations);
//! - `$6$<salt>$<hash>`: SHA-512 of the password followed by the salt (Mosquitto ≤ 1.6,
//!   `mosquitto_passwd -H sha512`);
//! - `$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>`: a PHC string, what `ringmq passwd`
//!   writes ([`PasswordHash::argon2id`]).
//!
//! Salts and hashes of `$6$`/`$7$` are standard base64 (Mosquitto pads them); PHC strings
//! use unpadded base64. Mosquitto's files work in ringmq unchanged; files that `ringmq
//! passwd` writes hold argon2id hashes, which Mosquitto cannot read.
//!
//! Semantics:
//! - A malformed line refuses the whole file ([`PasswordFileError`] names the path and
//!   the 1-based line): a half-read file would lock users out or, worse, let a typo
//!   through. User names and hashes are trimmed of surrounding blanks, as Mosquitto does.
//! - A user listed twice refuses the file, as Mosquitto's password-file plugin does
//!   (2.0.11 silently let the last line win; later 2.0 releases keep the first): which
//!   of two passwords was meant cannot be guessed.
//! - Costs are bounded ([`MAX_PBKDF2_ITERATIONS`], [`MAX_ARGON2_MEMORY_KIB`],
//!   [`MAX_ARGON2_WORK_KIB`], [`MAX_LINE_LEN`]) so that a hostile or mistaken file cannot
//!   make each CONNECT cost seconds of a core.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ahash::AHashMap;
use argon2::{Algorithm, Argon2, Version};
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD, STANDARD_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use ring::{digest, pbkdf2};

#[cfg(test)]
mod tests;

/// The longest line accepted: the longest MQTT user name (65,535 bytes) and room for any
/// hash within the other bounds.
pub const MAX_LINE_LEN: usize = 65_535 + 512;
/// The longest user name: MQTT's limit for a string.
pub const MAX_USER_LEN: usize = 65_535;
/// Most PBKDF2 iterations a `$7$` hash may ask for: under a second of one core
/// (Mosquitto writes 101; OWASP suggests 210,000 for PBKDF2-HMAC-SHA512).
pub const MAX_PBKDF2_ITERATIONS: u32 = 1_000_000;
/// Most memory an argon2id hash may ask for, in KiB (64 MiB), per verification.
pub const MAX_ARGON2_MEMORY_KIB: u32 = 64 * 1024;
/// Most work an argon2id hash may ask for, memory × passes in KiB: 64 MiB over four
/// passes, about 0.2 s of one core (the crate's default, 19 MiB × 2, about 30 ms).
pub const MAX_ARGON2_WORK_KIB: u64 = 4 * 64 * 1024;
/// Most lanes an argon2id hash may ask for (the crate computes them one after another).
pub const MAX_ARGON2_LANES: u32 = 16;
/// Longest salt accepted in a `$6$` or `$7$` hash, in bytes (Mosquitto writes 12).
pub const MAX_SALT_LEN: usize = 64;

/// Length of a SHA-512 output: the hash of `$6$` and `$7$` entries.
const SHA512_LEN: usize = 64;
/// Salt length of new argon2id hashes (the PHC recommendation).
const ARGON2_SALT_LEN: usize = 16;
/// Shortest argon2 salt the argon2 crate accepts.
const ARGON2_MIN_SALT_LEN: usize = 8;

/// Base64 as Mosquitto writes it (standard alphabet, padded), read whether padded or not.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a password file cannot be used. The whole file is refused.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {reason}", path.display())]
    Malformed { path: PathBuf, line: usize, reason: LineError },
    #[error("{}:{line}: user {user:?} is already listed on line {first}", path.display())]
    DuplicateUser { path: PathBuf, line: usize, first: usize, user: String },
}

/// What is wrong with one line of a password file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("line longer than {MAX_LINE_LEN} bytes")]
    TooLong,
    #[error("not valid UTF-8")]
    NotUtf8,
    #[error("no ':' between user name and hash")]
    NoColon,
    #[error("empty user name")]
    EmptyUser,
    #[error("user name longer than {MAX_USER_LEN} bytes")]
    UserTooLong,
    #[error("user name contains a control character")]
    UserControl,
    #[error("{0}")]
    Hash(#[from] HashError),
}

/// Why a hash cannot be read, or made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("empty hash")]
    Empty,
    #[error("unknown hash format (expected $7$, $6$ or $argon2id$)")]
    UnknownFormat,
    #[error("{0} hashes are not accepted (only argon2id)")]
    Argon2Variant(String),
    #[error("expected {expected} '$'-separated fields after the prefix")]
    FieldCount { expected: usize },
    #[error("iteration count {0:?} is not a number from 1 to {MAX_PBKDF2_ITERATIONS}")]
    Iterations(String),
    #[error("{field} is not valid base64")]
    Base64 { field: &'static str },
    #[error("salt of {0} bytes (expected 1 to {MAX_SALT_LEN})")]
    SaltLength(usize),
    #[error("hash of {0} bytes (expected {SHA512_LEN})")]
    HashLength(usize),
    #[error("argon2: {0}")]
    Argon2(String),
    #[error(
        "argon2 cost m={m_cost},t={t_cost},p={p_cost} over the bound (m at most \
         {MAX_ARGON2_MEMORY_KIB} KiB, m×t at most {MAX_ARGON2_WORK_KIB}, p at most {MAX_ARGON2_LANES})"
    )]
    Argon2Cost { m_cost: u32, t_cost: u32, p_cost: u32 },
    #[error("the system's random generator failed")]
    Random,
}

/// A stored password hash, validated and within the cost bounds when made.
#[derive(Clone, Debug)]
pub enum PasswordHash {
    /// `$6$`: SHA-512(password ‖ salt).
    Sha512(Sha512Hash),
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512(Pbkdf2Hash),
    /// `$argon2id$`: a PHC string.
    Argon2id(Argon2idHash),
}

/// The parts of a `$6$` hash.
#[derive(Clone)]
pub struct Sha512Hash {
    salt: Vec<u8>,
    hash: [u8; SHA512_LEN],
}

/// The parts of a `$7$` hash.
#[derive(Clone)]
pub struct Pbkdf2Hash {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: [u8; SHA512_LEN],
}

/// The parts of an argon2id PHC string, and the string itself (written back as read).
#[derive(Clone)]
pub struct Argon2idHash {
    version: Version,
    params: argon2::Params,
    salt: Vec<u8>,
    hash: Vec<u8>,
    text: String,
}

// Salts and hashes stay out of logs.
impl std::fmt::Debug for Sha512Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sha512Hash").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Pbkdf2Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pbkdf2Hash").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Argon2idHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Argon2idHash")
            .field("m_cost", &self.params.m_cost())
            .field("t_cost", &self.params.t_cost())
            .field("p_cost", &self.params.p_cost())
            .finish_non_exhaustive()
    }
}

impl Pbkdf2Hash {
    pub fn iterations(&self) -> u32 {
        self.iterations.get()
    }
}

impl Argon2idHash {
    /// (memory in KiB, passes, lanes).
    pub fn cost(&self) -> (u32, u32, u32) {
        (self.params.m_cost(), self.params.t_cost(), self.params.p_cost())
    }
}

/// What a verification costs: entries with equal keys take the same time to check.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum CostKey {
    Sha512,
    Pbkdf2(u32),
    Argon2id { m_cost: u32, t_cost: u32, p_cost: u32, out_len: usize },
}

impl PasswordHash {
    /// Whether `password` hashes to this hash; the final comparison is constant-time.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Sha512(h) => {
                let mut ctx = digest::Context::new(&digest::SHA512);
                ctx.update(password);
                ctx.update(&h.salt);
                constant_time_eq(ctx.finish().as_ref(), &h.hash)
            }
            // ring compares in constant time.
            PasswordHash::Pbkdf2Sha512(h) => {
                pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA512, h.iterations, &h.salt, password, &h.hash).is_ok()
            }
            PasswordHash::Argon2id(h) => {
                let argon = Argon2::new(Algorithm::Argon2id, h.version, h.params.clone());
                let mut out = vec![0u8; h.hash.len()];
                // Parsing checked every input the crate validates; an error still fails closed.
                argon.hash_password_into(password, &h.salt, &mut out).is_ok()
                    && constant_time_eq(&out, &h.hash)
            }
        }
    }

    /// A new argon2id hash of `password` (the argon2 crate's default cost) with a fresh
    /// random salt.
    ///
    /// # Panics
    /// If the operating system's random generator fails, which Linux's `getrandom` does
    /// not once booted; [`PasswordHash::try_argon2id`] reports it instead.
    pub fn argon2id(password: &[u8]) -> PasswordHash {
        match PasswordHash::try_argon2id(password) {
            Ok(hash) => hash,
            Err(e) => panic!("cannot hash a password: {e}"),
        }
    }

    /// [`PasswordHash::argon2id`], with a failure of the random generator (or a password
    /// over argon2's 4 GiB) reported.
    pub fn try_argon2id(password: &[u8]) -> Result<PasswordHash, HashError> {
        use ring::rand::SecureRandom;
        let mut salt = [0u8; ARGON2_SALT_LEN];
        ring::rand::SystemRandom::new().fill(&mut salt).map_err(|_| HashError::Random)?;
        let params = argon2::Params::default();
        let mut hash = vec![0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
            .hash_password_into(password, &salt, &mut hash)
            .map_err(|e| HashError::Argon2(e.to_string()))?;
        let text = format!(
            "$argon2id$v=19$m={},t={},p={}${}${}",
            params.m_cost(),
            params.t_cost(),
            params.p_cost(),
            STANDARD_NO_PAD.encode(salt),
            STANDARD_NO_PAD.encode(&hash)
        );
        Ok(PasswordHash::Argon2id(Argon2idHash {
            version: Version::V0x13,
            params,
            salt: salt.to_vec(),
            hash,
            text,
        }))
    }

    /// The hash as written after `user:` in a password file; parses back to an equal hash.
    pub fn encode(&self) -> String {
        match self {
            PasswordHash::Sha512(h) => format!("$6${}${}", STANDARD.encode(&h.salt), STANDARD.encode(h.hash)),
            PasswordHash::Pbkdf2Sha512(h) => {
                format!("$7${}${}${}", h.iterations, STANDARD.encode(&h.salt), STANDARD.encode(h.hash))
            }
            PasswordHash::Argon2id(h) => h.text.clone(),
        }
    }

    fn cost_key(&self) -> CostKey {
        match self {
            PasswordHash::Sha512(_) => CostKey::Sha512,
            PasswordHash::Pbkdf2Sha512(h) => CostKey::Pbkdf2(h.iterations.get()),
            PasswordHash::Argon2id(h) => CostKey::Argon2id {
                m_cost: h.params.m_cost(),
                t_cost: h.params.t_cost(),
                p_cost: h.params.p_cost(),
                out_len: h.hash.len(),
            },
        }
    }
}

impl FromStr for PasswordHash {
    type Err = HashError;

    fn from_str(text: &str) -> Result<PasswordHash, HashError> {
        if text.is_empty() {
            return Err(HashError::Empty);
        }
        if let Some(rest) = text.strip_prefix("$7$") {
            let [iterations, salt, hash] = fields::<3>(rest)?;
            let iterations = parse_iterations(iterations)?;
            let (salt, hash) = (decode_salt(salt)?, decode_sha512(hash)?);
            return Ok(PasswordHash::Pbkdf2Sha512(Pbkdf2Hash { iterations, salt, hash }));
        }
        if let Some(rest) = text.strip_prefix("$6$") {
            let [salt, hash] = fields::<2>(rest)?;
            let (salt, hash) = (decode_salt(salt)?, decode_sha512(hash)?);
            return Ok(PasswordHash::Sha512(Sha512Hash { salt, hash }));
        }
        if text.starts_with("$argon2") {
            return parse_argon2id(text).map(PasswordHash::Argon2id);
        }
        Err(HashError::UnknownFormat)
    }
}

/// Exactly `N` `$`-separated fields.
fn fields<const N: usize>(rest: &str) -> Result<[&str; N], HashError> {
    let mut out = [""; N];
    let mut parts = rest.split('$');
    for slot in out.iter_mut() {
        *slot = parts.next().ok_or(HashError::FieldCount { expected: N })?;
    }
    if parts.next().is_some() {
        return Err(HashError::FieldCount { expected: N });
    }
    Ok(out)
}

fn parse_iterations(text: &str) -> Result<NonZeroU32, HashError> {
    let bad = || HashError::Iterations(text.chars().take(20).collect());
    // u32::from_str takes a leading '+', which Mosquitto never writes.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n = text.parse::<u32>().map_err(|_| bad())?;
    NonZeroU32::new(n).filter(|n| n.get() <= MAX_PBKDF2_ITERATIONS).ok_or_else(bad)
}

fn decode_salt(text: &str) -> Result<Vec<u8>, HashError> {
    let salt = BASE64_LENIENT.decode(text).map_err(|_| HashError::Base64 { field: "salt" })?;
    if salt.is_empty() || salt.len() > MAX_SALT_LEN {
        return Err(HashError::SaltLength(salt.len()));
    }
    Ok(salt)
}

fn decode_sha512(text: &str) -> Result<[u8; SHA512_LEN], HashError> {
    let hash = BASE64_LENIENT.decode(text).map_err(|_| HashError::Base64 { field: "hash" })?;
    let len = hash.len();
    hash.try_into().map_err(|_| HashError::HashLength(len))
}

fn parse_argon2id(text: &str) -> Result<Argon2idHash, HashError> {
    let phc = argon2::PasswordHash::new(text).map_err(|e| HashError::Argon2(e.to_string()))?;
    let algorithm = phc.algorithm.as_str();
    if algorithm != "argon2id" {
        return Err(HashError::Argon2Variant(algorithm.chars().take(20).collect()));
    }
    let version = match phc.version {
        Some(v) => Version::try_from(v).map_err(|e| HashError::Argon2(e.to_string()))?,
        None => Version::default(),
    };
    let params = argon2::Params::try_from(&phc).map_err(|e| HashError::Argon2(e.to_string()))?;
    let (m_cost, t_cost, p_cost) = (params.m_cost(), params.t_cost(), params.p_cost());
    if m_cost > MAX_ARGON2_MEMORY_KIB
        || u64::from(m_cost) * u64::from(t_cost) > MAX_ARGON2_WORK_KIB
        || p_cost > MAX_ARGON2_LANES
    {
        return Err(HashError::Argon2Cost { m_cost, t_cost, p_cost });
    }
    let salt = phc.salt.ok_or_else(|| HashError::Argon2("no salt".into()))?;
    let mut buf = [0u8; argon2::password_hash::Salt::MAX_LENGTH];
    let salt = salt.decode_b64(&mut buf).map_err(|_| HashError::Base64 { field: "salt" })?.to_vec();
    if salt.len() < ARGON2_MIN_SALT_LEN {
        return Err(HashError::SaltLength(salt.len()));
    }
    let hash = phc.hash.ok_or_else(|| HashError::Argon2("no hash".into()))?.as_bytes().to_vec();
    Ok(Argon2idHash { version, params, salt, hash, text: text.to_string() })
}

/// Equality whose time depends on the lengths only (fixed by the format, so public).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// One line of a password file, after its line ending.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line<'a> {
    /// Blank or a `#` comment.
    Ignored,
    /// `user:hash`, both trimmed of surrounding blanks.
    Entry { user: &'a str, hash: &'a str },
}

/// Classifies one line (without its `\n`; a trailing `\r` is dropped).
pub(crate) fn split_line(line: &str) -> Result<Line<'_>, LineError> {
    if line.len() > MAX_LINE_LEN {
        return Err(LineError::TooLong);
    }
    let line = line.strip_suffix('\r').unwrap_or(line);
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(Line::Ignored);
    }
    let (user, hash) = trimmed.split_once(':').ok_or(LineError::NoColon)?;
    let (user, hash) = (user.trim(), hash.trim());
    if user.is_empty() {
        return Err(LineError::EmptyUser);
    }
    if user.len() > MAX_USER_LEN {
        return Err(LineError::UserTooLong);
    }
    if user.chars().any(char::is_control) {
        return Err(LineError::UserControl);
    }
    Ok(Line::Entry { user, hash })
}

/// A file's text, or why it cannot be read; invalid UTF-8 is reported at its line.
pub(crate) fn read_text(path: &Path) -> Result<String, PasswordFileError> {
    let bytes =
        std::fs::read(path).map_err(|source| PasswordFileError::Io { path: path.to_path_buf(), source })?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let line = e.as_bytes().get(..valid).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count()) + 1;
        PasswordFileError::Malformed { path: path.to_path_buf(), line, reason: LineError::NotUtf8 }
    })
}

/// The users of a password file and their hashes.
///
/// Invariants: every hash is within the cost bounds; `dummy` is `Some` whenever `users`
/// is not empty, and is a clone of the hash kind most entries share (so checking an
/// unknown user costs what checking most known users costs).
#[derive(Clone)]
pub struct PasswordFile {
    users: AHashMap<String, PasswordHash>,
    dummy: Option<PasswordHash>,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile").field("users", &self.users.len()).finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// Reads the text of a password file; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<PasswordFile, PasswordFileError> {
        let mut users = AHashMap::new();
        let mut first_line: AHashMap<&str, usize> = AHashMap::new();
        // Per cost: how many entries share it, and the first of them.
        let mut costs: AHashMap<CostKey, (usize, usize)> = AHashMap::new();
        let mut order = Vec::new();
        for (index, line) in text.split('\n').enumerate() {
            let number = index + 1;
            let malformed =
                |reason| PasswordFileError::Malformed { path: path.to_path_buf(), line: number, reason };
            let (user, hash) = match split_line(line).map_err(malformed)? {
                Line::Ignored => continue,
                Line::Entry { user, hash } => (user, hash),
            };
            if let Some(&first) = first_line.get(user) {
                return Err(PasswordFileError::DuplicateUser {
                    path: path.to_path_buf(),
                    line: number,
                    first,
                    user: user.to_string(),
                });
            }
            let hash: PasswordHash = hash.parse().map_err(|e| malformed(LineError::Hash(e)))?;
            let cost = costs.entry(hash.cost_key()).or_insert((0, order.len()));
            cost.0 += 1;
            first_line.insert(user, number);
            order.push(user);
            users.insert(user.to_string(), hash);
        }
        let dummy = costs
            .values()
            .max_by_key(|&&(count, first)| (count, std::cmp::Reverse(first)))
            .and_then(|&(_, first)| order.get(first))
            .and_then(|user| users.get(*user))
            .cloned();
        Ok(PasswordFile { users, dummy })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        PasswordFile::parse(&read_text(path)?, path)
    }

    pub fn get(&self, user: &str) -> Option<&PasswordHash> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Verifies user and password. An unknown user is checked against a hash of the
    /// kind most entries have, so its cost does not tell that the user is unknown.
    /// Takes up to hundreds of milliseconds (argon2id, PBKDF2): callers run it off the
    /// executor.
    pub fn check(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                if let Some(dummy) = &self.dummy {
                    std::hint::black_box(dummy.verify(password));
                }
                false
            }
        }
    }
}
