//! The key index: a hash map split into 256 parts by key hash. A single map with millions of
//! keys rehashes all of them when it grows, stalling apply for tens of milliseconds (measured:
//! 60 ms p99 spikes in the open-loop cluster benchmark at each doubling); 256 parts each grow
//! on their own, so a growth step moves 1/256 of the keys. Hashing is ahash, keyed at random per
//! process so clients cannot choose colliding keys.
//!
//! Keys of up to [`INLINE_KEY_BYTES`] bytes are stored in the table itself ([`Key`]): a lookup
//! then compares against bytes already in the cache line it probed, instead of following a
//! pointer to a heap allocation (a cache miss per lookup with millions of keys: ~17% of a
//! shard's time in the in-process benchmark), and a new key costs no allocation.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// The longest key kept inline (the key is 24 bytes either way, as large as a boxed slice plus
/// a tag).
pub(crate) const INLINE_KEY_BYTES: usize = 22;

/// A key: inline when short, boxed otherwise.
pub(crate) type Key = SmallBytes<INLINE_KEY_BYTES>;

/// Bytes held in place when at most `N` of them, boxed otherwise; hashes, compares, borrows
/// and derefs as its bytes. Index keys use it (`Key`), and so do in-memory values in the
/// index entry (`kv::InlineValue`).
#[derive(Clone)]
pub(crate) enum SmallBytes<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Heap(Box<[u8]>),
}

impl<const N: usize> SmallBytes<N> {
    pub(crate) fn new(from: &[u8]) -> SmallBytes<N> {
        const { assert!(N <= u8::MAX as usize) };
        if from.len() <= N {
            let mut bytes = [0; N];
            bytes[..from.len()].copy_from_slice(from);
            SmallBytes::Inline {
                len: from.len() as u8,
                bytes,
            }
        } else {
            SmallBytes::Heap(from.into())
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            SmallBytes::Inline { len, bytes } => &bytes[..*len as usize],
            SmallBytes::Heap(bytes) => bytes,
        }
    }
}

impl<const N: usize> From<&[u8]> for SmallBytes<N> {
    fn from(bytes: &[u8]) -> SmallBytes<N> {
        SmallBytes::new(bytes)
    }
}

impl<const N: usize> std::ops::Deref for SmallBytes<N> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<const N: usize> std::ops::DerefMut for SmallBytes<N> {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            SmallBytes::Inline { len, bytes } => &mut bytes[..*len as usize],
            SmallBytes::Heap(bytes) => bytes,
        }
    }
}

impl<const N: usize> std::fmt::Debug for SmallBytes<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x?}", self.as_bytes())
    }
}

impl<const N: usize> Borrow<[u8]> for SmallBytes<N> {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<const N: usize> Hash for SmallBytes<N> {
    // Must hash exactly as `[u8]` does: lookups hash the borrowed form.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl<const N: usize> PartialEq for SmallBytes<N> {
    fn eq(&self, other: &SmallBytes<N>) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl<const N: usize> Eq for SmallBytes<N> {}

type Part<V> = HashMap<Key, V, ahash::RandomState>;

pub(crate) const PARTS: usize = 256;

pub(crate) struct Index<V> {
    router: ahash::RandomState,
    parts: Box<[Part<V>]>,
    len: usize,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Index::with_capacity(0, None)
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for Index<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("len", &self.len).finish()
    }
}

impl<V> Index<V> {
    /// An index with room for `capacity` keys. With a `seed`, hashing (and so the order of
    /// iteration) is the same in every process: for deterministic simulation only.
    pub(crate) fn with_capacity(capacity: usize, seed: Option<u64>) -> Index<V> {
        let per_part = capacity.div_ceil(PARTS);
        let hasher = |n: u64| match seed {
            Some(seed) => ahash::RandomState::with_seeds(seed, n, seed ^ n, 0x5eed),
            None => ahash::RandomState::new(),
        };
        Index {
            router: hasher(u64::MAX),
            parts: (0..PARTS)
                .map(|n| Part::with_capacity_and_hasher(per_part, hasher(n as u64)))
                .collect(),
            len: 0,
        }
    }

    /// The part (`0..PARTS`) that holds `key`.
    pub(crate) fn part_of(&self, key: &[u8]) -> usize {
        (self.router.hash_one(key) >> 56) as usize
    }

    /// Keys in one part.
    pub(crate) fn part_len(&self, part: usize) -> usize {
        self.parts[part].len()
    }

    /// The entries of one part.
    pub(crate) fn part_entries(&self, part: usize) -> impl Iterator<Item = (&Key, &V)> {
        self.parts[part].iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&V> {
        self.parts[self.part_of(key)].get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let part = self.part_of(key);
        self.parts[part].get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: &[u8], value: V) -> Option<V> {
        let part = self.part_of(key);
        let old = self.parts[part].insert(Key::new(key), value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        let part = self.part_of(key);
        let old = self.parts[part].remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &V)> {
        self.entries().map(|(k, v)| (k.as_bytes(), v))
    }

    /// Entries with their stored keys (cloning a short key costs no allocation).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&Key, &V)> {
        self.parts.iter().flat_map(|p| p.iter())
    }

    pub(crate) fn extend<K: AsRef<[u8]>>(&mut self, items: impl IntoIterator<Item = (K, V)>) {
        for (key, value) in items {
            self.insert(key.as_ref(), value);
        }
    }
}

impl<'a, V> IntoIterator for &'a Index<V> {
    type Item = (&'a [u8], &'a V);
    type IntoIter = Box<dyn Iterator<Item = (&'a [u8], &'a V)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_one_map() {
        let mut index = Index::default();
        let mut model = std::collections::BTreeMap::new();
        for i in 0..5000u32 {
            let key: Box<[u8]> = (i % 1500).to_le_bytes().into();
            match i % 7 {
                0 => assert_eq!(index.remove(&key), model.remove(&key)),
                _ => assert_eq!(index.insert(&key, i), model.insert(key, i)),
            }
            assert_eq!(index.len(), model.len());
        }
        for (key, value) in &model {
            assert_eq!(index.get(key), Some(value));
        }
        if let Some(v) = index.get_mut(&1u32.to_le_bytes()) {
            *v += 1;
            *model.get_mut(&Box::<[u8]>::from(1u32.to_le_bytes())).unwrap() += 1;
        }
        let mut all: Vec<_> = index.iter().map(|(k, v)| (Box::<[u8]>::from(k), *v)).collect();
        all.sort();
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        let used = index.parts.iter().filter(|p| !p.is_empty()).count();
        assert!(used > 200, "keys spread over the parts ({used} used)");
    }

    #[test]
    fn short_and_long_keys_are_found_by_their_bytes() {
        let mut index = Index::default();
        let keys: Vec<Vec<u8>> = [0, 1, 21, 22, 23, 64, 300]
            .iter()
            .map(|&n| (0..n).map(|i| i as u8 ^ 0x5a).collect())
            .collect();
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(index.insert(key, i), None);
        }
        // A key and the same bytes plus a zero must differ (inline padding is zeros).
        let mut padded = keys[1].clone();
        padded.push(0);
        assert_eq!(index.get(&padded), None);
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(index.get(key), Some(&i), "{} bytes", key.len());
            assert_eq!(Key::new(key).as_bytes(), &key[..]);
            let inline = matches!(Key::new(key), SmallBytes::Inline { .. });
            assert_eq!(inline, key.len() <= INLINE_KEY_BYTES);
        }
        assert_eq!(index.insert(&keys[6], 99), Some(6));
        assert_eq!(index.remove(&keys[3]), Some(3));
        assert_eq!(index.get(&keys[3]), None);
        assert_eq!(index.len(), keys.len() - 1);
        assert_eq!(std::mem::size_of::<Key>(), 24);
    }
}
