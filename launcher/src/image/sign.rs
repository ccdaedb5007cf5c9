//! Signed images. Chunk checksums (xxh3) prove an image whole, not who made it: anyone who can write a file can
//! frame any job, and restoring an image runs it. With a key, the supervisor appends a Signature chunk after End
//! (`vos::chunk`): a keyed BLAKE3 MAC of every byte before it. A restore or inspect given a key (or finding the
//! host's, `DEFAULT_KEY`) refuses an image that does not carry a MAC by that key before it acts on any of it.
//!
//! Keys are files of exactly 32 bytes (`head -c 32 /dev/urandom`, as for `vrun migrate`), private to their owner
//! (no group or other permission bits), owned by the caller or root, never reached through a symlink. What is
//! used is derived from the file's bytes for this purpose alone, so the same file may also serve migration.

use anyhow::{Context, Result, bail};
use blake3::hazmat::{HasherExt, Mode, left_subtree_len, merge_subtrees_root};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vos::chunk::SIGNATURE_LEN;

/// The host's key: used when none is named, if it exists and the caller can read it (root, normally).
pub const DEFAULT_KEY: &str = "/etc/vos/image.key";
/// `alg` of a Signature chunk: keyed BLAKE3-256.
const ALG_BLAKE3: u32 = 1;
const MAC_CONTEXT: &str = "vOS 2026 image signature v1";
const ID_CONTEXT: &str = "vOS 2026 image key id v1";

/// A signing key, derived from a key file.
#[derive(Clone)]
pub struct Key {
    mac: [u8; 32],
    /// Names the key in images and messages (derived too: it tells nothing of the key).
    pub id: [u8; 16],
    /// Where it came from, for messages.
    pub from: String,
}

impl Key {
    /// The key of a key file's 32 bytes.
    pub fn derive(raw: &[u8; 32], from: String) -> Key {
        let mut id = [0u8; 16];
        id.copy_from_slice(&blake3::derive_key(ID_CONTEXT, raw)[..16]);
        Key { mac: blake3::derive_key(MAC_CONTEXT, raw), id, from }
    }

    pub fn load(path: &Path) -> Result<Key> {
        Ok(Key::derive(&read_key_file(path)?, path.display().to_string()))
    }

    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A key file's 32 bytes, once it is known to be private: a regular file (not through a symlink), owned by the
/// caller or root, with no permission for group or others.
pub fn read_key_file(path: &Path) -> Result<[u8; 32]> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!("key file {shown} is a symbolic link: name the file itself"),
            _ => anyhow::anyhow!("key file {shown}: {e}"),
        })?;
    let st = nix::sys::stat::fstat(&f).with_context(|| format!("key file {shown}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        bail!("key file {shown} is not a regular file");
    }
    if st.st_uid != me && st.st_uid != 0 {
        bail!("key file {shown} belongs to user {}: a key must be your own (or root's)", st.st_uid);
    }
    if st.st_mode & 0o077 != 0 {
        bail!("key file {shown} can be read or changed by others (mode {:o}): chmod 600 {shown}", st.st_mode & 0o7777);
    }
    let mut bytes = Vec::with_capacity(33);
    f.take(33).read_to_end(&mut bytes).with_context(|| format!("key file {shown}"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        anyhow::anyhow!("key file {shown} must hold exactly 32 bytes (make one with: head -c 32 /dev/urandom > {shown}; chmod 600 {shown})")
    })
}

/// The key to use: the one named, else the host's (`DEFAULT_KEY`) if it exists and the caller may read it. A
/// host key that exists but is not private is an error, not a reason to go on without it.
pub fn resolve(named: Option<&Path>) -> Result<Option<Key>> {
    if let Some(p) = named {
        return Key::load(p).map(Some);
    }
    let p = Path::new(DEFAULT_KEY);
    match std::fs::symlink_metadata(p) {
        Err(_) => Ok(None),
        // Not this user's to use (the host's key is root's): images of this user are neither signed nor checked.
        Ok(_) if nix::unistd::access(p, nix::unistd::AccessFlags::R_OK).is_err() => Ok(None),
        Ok(_) => Key::load(p).map(Some),
    }
}

/// A Signature chunk's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature {
    /// The bytes it covers: the image up to this chunk.
    pub signed: u64,
    pub key_id: [u8; 16],
    pub mac: [u8; 32],
}

impl Signature {
    pub fn encode(&self) -> [u8; SIGNATURE_LEN] {
        let mut b = [0u8; SIGNATURE_LEN];
        b[..4].copy_from_slice(&ALG_BLAKE3.to_le_bytes());
        b[8..16].copy_from_slice(&self.signed.to_le_bytes());
        b[16..32].copy_from_slice(&self.key_id);
        b[32..].copy_from_slice(&self.mac);
        b
    }

    /// None when `b` is not a signature this vrun knows (its length, algorithm or reserved bytes).
    pub fn decode(b: &[u8]) -> Option<Signature> {
        let b: &[u8; SIGNATURE_LEN] = b.try_into().ok()?;
        if b[..4] != ALG_BLAKE3.to_le_bytes() || b[4..8] != [0; 4] {
            return None;
        }
        let mut s = Signature { signed: u64::from_le_bytes(b[8..16].try_into().ok()?), key_id: [0; 16], mac: [0; 32] };
        s.key_id.copy_from_slice(&b[16..32]);
        s.mac.copy_from_slice(&b[32..]);
        Some(s)
    }
}

/// Images up to this size are hashed on one thread.
const SPLIT_MIN: u64 = 16 << 20;
/// Read size: a block stays in cache while it is hashed.
const BLOCK: usize = 64 << 10;

/// The keyed BLAKE3 hash of the first `len` bytes of `f` (read with pread: the file's offset is left alone).
/// A large file is hashed as the two halves of BLAKE3's own tree, on two threads where the process may start one,
/// and the halves are merged at the root (blake3's `hazmat`): the very hash `blake3::keyed_hash` gives, at twice
/// the speed on two cores. (A supervisor cannot start threads: its children's pid and time namespaces are not its
/// own, and clone(CLONE_THREAD) then fails. It hashes on one.)
pub fn mac(f: &File, len: u64, key: &Key) -> std::io::Result<[u8; 32]> {
    if len <= SPLIT_MIN {
        let mut h = blake3::Hasher::new_keyed(&key.mac);
        hash_range(f, &mut h, 0, len)?;
        return Ok(*h.finalize().as_bytes());
    }
    // BLAKE3's tree splits an input of more than one chunk (1 KiB) here: the left subtree is whole and complete.
    let left = left_subtree_len(len);
    let hash_left = || {
        let mut h = blake3::Hasher::new_keyed(&key.mac);
        hash_range(f, &mut h, 0, left).map(|_| h.finalize_non_root())
    };
    let hash_right = || {
        let mut h = blake3::Hasher::new_keyed(&key.mac);
        h.set_input_offset(left);
        hash_range(f, &mut h, left, len).map(|_| h.finalize_non_root())
    };
    let (l, r) = std::thread::scope(|s| match std::thread::Builder::new().spawn_scoped(s, hash_left) {
        Ok(t) => {
            let r = hash_right();
            (t.join().unwrap_or_else(|_| Err(std::io::Error::other("hashing thread failed"))), r)
        }
        Err(_) => (hash_left(), hash_right()),
    });
    Ok(*merge_subtrees_root(&l?, &r?, Mode::KeyedHash(&key.mac)).as_bytes())
}

fn hash_range(f: &File, h: &mut blake3::Hasher, start: u64, end: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; BLOCK];
    let mut at = start;
    while at < end {
        let n = BLOCK.min((end - at) as usize);
        f.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(())
}

/// Constant-time equality of two MACs.
pub fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(*b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_mac_is_blake3_keyed_hash() {
        let key = Key::derive(&[9u8; 32], "test".into());
        let dir = std::env::temp_dir().join(format!("vos-sign-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("data");
        let mut data = vec![0u8; (SPLIT_MIN as usize) * 2 + 3 * 1024 + 17];
        let mut x = 0x1234_5678_9abc_def1u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let k = 1u64 << 20;
        for len in [0, 1, 1023, 1024, 1025, 2048, 4097, SPLIT_MIN, SPLIT_MIN + 1, SPLIT_MIN + 1025, 2 * SPLIT_MIN, 2 * SPLIT_MIN + 1, 17 * k + 3, data.len() as u64] {
            let want = blake3::keyed_hash(&key.mac, &data[..len as usize]);
            assert_eq!(mac(&f, len, &key).unwrap(), *want.as_bytes(), "length {len}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn signatures_decode_only_when_well_formed() {
        let s = Signature { signed: 12345, key_id: [3; 16], mac: [7; 32] };
        assert_eq!(Signature::decode(&s.encode()), Some(s));
        let mut b = s.encode();
        b[0] = 2;
        assert_eq!(Signature::decode(&b), None);
        let mut b = s.encode();
        b[5] = 1;
        assert_eq!(Signature::decode(&b), None);
        assert_eq!(Signature::decode(&s.encode()[..63]), None);
        let a = Key::derive(&[1; 32], "a".into());
        let b = Key::derive(&[2; 32], "b".into());
        assert_ne!(a.id, b.id);
        assert_ne!(a.mac, b.mac);
        assert_ne!(a.mac[..16], a.id[..], "the id is not the key");
    }
}
