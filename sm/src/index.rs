//! The key index: a hash map split into 256 parts by key hash. A single map with millions of
//! keys rehashes all of them when it grows, stalling apply for tens of milliseconds (measured:
//! 60 ms p99 spikes in the open-loop cluster benchmark at each doubling); 256 parts each grow
//! on their own, so a growth step moves 1/256 of the keys. Hashing is ahash, keyed at random per
//! process so clients cannot choose colliding keys; one hash chooses the part (its top byte),
//! the slot in the part (its low bits) and the slot's tag.
//!
//! The parts are hand-written open-addressing tables rather than `std`'s map because a lookup's
//! cost is almost all waiting for memory (two cache misses: a control byte and the slot), and
//! only a table whose layout we know can tell where a key will be looked for before the lookup:
//! apply prefetches the slots of the next few commands of a batch ([`Index::prefetch`]) and so
//! overlaps their misses.
//!
//! Keys of up to [`INLINE_KEY_BYTES`] bytes are stored in the table itself ([`Key`]): a lookup
//! then compares against bytes already in the cache line it probed, instead of following a
//! pointer to a heap allocation (a cache miss per lookup with millions of keys: ~17% of a
//! shard's time in the in-process benchmark), and a new key costs no allocation.

use std::borrow::Borrow;
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

pub(crate) const PARTS: usize = 256;

/// Control bytes: a slot is empty, was emptied (a probe goes on past it), or full, with seven
/// bits of its key's hash as a tag that a probe compares before it reads the slot.
const EMPTY: u8 = 0;
const DELETED: u8 = 1;
const FULL: u8 = 0x80;

/// At most this share of a part's slots is full or deleted, as in `std`'s map: the index is
/// most of a node's memory, and a part doubles when it passes this, so a lower bound costs up to
/// twice the memory for some key counts (3/4 was measured: +110 MB at 875k keys, no faster).
/// Linear probing at 7/8 reads up to a few dozen control bytes on a miss, a cache line or two;
/// the tags keep it from reading slots.
const LOAD_NUM: usize = 7;
const LOAD_DEN: usize = 8;

/// One part: an open-addressing table with linear probing, so that where a key would be is
/// known from its hash alone and can be prefetched ([`Index::prefetch`]) before it is looked up.
/// The control bytes and the slots are separate arrays: a probe reads one or two control bytes
/// and then the one slot whose tag matches.
///
/// Invariants: `ctrl.len() == slots.len()`, a power of two or zero; `slots[i]` is `Some` exactly
/// when `ctrl[i] >= FULL`; `len` counts full slots and `deleted` deleted ones; at least one slot
/// is empty whenever there are any (every probe ends).
struct Part<V> {
    ctrl: Box<[u8]>,
    slots: Box<[Option<(Key, V)>]>,
    len: usize,
    deleted: usize,
}

impl<V> Part<V> {
    fn with_capacity(capacity: usize) -> Part<V> {
        if capacity == 0 {
            return Part::with_buckets(0);
        }
        Part::with_buckets(
            (capacity * LOAD_DEN)
                .div_ceil(LOAD_NUM)
                .next_power_of_two()
                .max(8),
        )
    }

    fn with_buckets(buckets: usize) -> Part<V> {
        Part {
            ctrl: vec![EMPTY; buckets].into_boxed_slice(),
            slots: (0..buckets).map(|_| None).collect(),
            len: 0,
            deleted: 0,
        }
    }

    fn mask(&self) -> usize {
        self.ctrl.len().wrapping_sub(1)
    }

    fn tag(hash: u64) -> u8 {
        // Bits 49..56: the part is chosen by bits 56..64, the home slot by the low bits.
        FULL | (hash >> 49) as u8 & 0x7f
    }

    /// The slot holding `key`.
    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        if self.ctrl.is_empty() {
            return None;
        }
        let (mask, tag) = (self.mask(), Part::<V>::tag(hash));
        let mut at = hash as usize & mask;
        loop {
            match self.ctrl[at] {
                EMPTY => return None,
                c if c == tag => match &self.slots[at] {
                    Some((stored, _)) if stored.as_bytes() == key => return Some(at),
                    _ => {}
                },
                _ => {}
            }
            at = (at + 1) & mask;
        }
    }

    fn get(&self, hash: u64, key: &[u8]) -> Option<&V> {
        let at = self.find(hash, key)?;
        self.slots[at].as_ref().map(|(_, value)| value)
    }

    fn get_mut(&mut self, hash: u64, key: &[u8]) -> Option<&mut V> {
        let at = self.find(hash, key)?;
        self.slots[at].as_mut().map(|(_, value)| value)
    }

    fn insert(&mut self, hash: u64, key: &[u8], value: V, hash_of: impl Fn(&[u8]) -> u64) -> Option<V> {
        if let Some(at) = self.find(hash, key) {
            let (_, old) = self.slots[at].as_mut().expect("a found slot is full");
            return Some(std::mem::replace(old, value));
        }
        if (self.len + self.deleted + 1) * LOAD_DEN > self.ctrl.len() * LOAD_NUM {
            self.rehash(hash_of);
        }
        self.place(hash, Key::new(key), value);
        None
    }

    /// Puts a key known to be absent in the first free slot from its home (a deleted one is
    /// reused). There is room: callers keep the load under its bound.
    fn place(&mut self, hash: u64, key: Key, value: V) {
        let mask = self.mask();
        let mut at = hash as usize & mask;
        while self.ctrl[at] >= FULL {
            at = (at + 1) & mask;
        }
        if self.ctrl[at] == DELETED {
            self.deleted -= 1;
        }
        self.ctrl[at] = Part::<V>::tag(hash);
        self.slots[at] = Some((key, value));
        self.len += 1;
    }

    fn remove(&mut self, hash: u64, key: &[u8]) -> Option<V> {
        let at = self.find(hash, key)?;
        let (_, value) = self.slots[at].take().expect("a found slot is full");
        // A probe that reached this slot would stop at the next one if that is empty, so this
        // one may become empty too; otherwise probes must go on past it.
        if self.ctrl[(at + 1) & self.mask()] == EMPTY {
            self.ctrl[at] = EMPTY;
        } else {
            self.ctrl[at] = DELETED;
            self.deleted += 1;
        }
        self.len -= 1;
        Some(value)
    }

    /// Makes room for one more key: twice the slots when more than half the allowed load is
    /// live keys, otherwise as many slots with the deleted ones cleared.
    fn rehash(&mut self, hash_of: impl Fn(&[u8]) -> u64) {
        let buckets = self.ctrl.len();
        let buckets = if (self.len + 1) * LOAD_DEN * 2 <= buckets * LOAD_NUM {
            buckets
        } else {
            (buckets * 2).max(8)
        };
        let old = std::mem::replace(self, Part::with_buckets(buckets));
        for (key, value) in old.slots.into_vec().into_iter().flatten() {
            self.place(hash_of(key.as_bytes()), key, value);
        }
    }

    /// Asks the CPU to bring in the control byte and the slot where a key of this hash would
    /// be first looked for, without waiting for them.
    fn prefetch(&self, hash: u64) {
        if self.ctrl.is_empty() {
            return;
        }
        let at = hash as usize & self.mask();
        prefetch_read(&self.ctrl[at] as *const u8);
        let slot = &self.slots[at] as *const Option<(Key, V)> as *const u8;
        prefetch_read(slot);
        prefetch_read(slot.wrapping_add(std::mem::size_of::<Option<(Key, V)>>() - 1));
    }

    fn iter(&self) -> impl Iterator<Item = (&Key, &V)> {
        self.slots
            .iter()
            .filter_map(|slot| slot.as_ref().map(|(key, value)| (key, value)))
    }
}

/// A hint to the CPU to load the cache line holding `at`; never faults, whatever the address.
fn prefetch_read(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing the program sees and does not fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

pub(crate) struct Index<V> {
    hasher: ahash::RandomState,
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
        Index {
            hasher: match seed {
                Some(seed) => ahash::RandomState::with_seeds(seed, !seed, seed ^ 0x5eed, 0x5eed),
                None => ahash::RandomState::new(),
            },
            parts: (0..PARTS).map(|_| Part::with_capacity(per_part)).collect(),
            len: 0,
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn part_of_hash(hash: u64) -> usize {
        (hash >> 56) as usize
    }

    /// The part (`0..PARTS`) that holds `key`.
    pub(crate) fn part_of(&self, key: &[u8]) -> usize {
        Index::<V>::part_of_hash(self.hash(key))
    }

    /// Keys in one part.
    pub(crate) fn part_len(&self, part: usize) -> usize {
        self.parts[part].len
    }

    /// The entries of one part.
    pub(crate) fn part_entries(&self, part: usize) -> impl Iterator<Item = (&Key, &V)> {
        self.parts[part].iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Starts loading the memory a lookup of `key` will read, so that a lookup a few commands
    /// later does not wait for it (with millions of keys, almost every lookup misses the cache).
    pub(crate) fn prefetch(&self, key: &[u8]) {
        let hash = self.hash(key);
        self.parts[Index::<V>::part_of_hash(hash)].prefetch(hash);
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&V> {
        let hash = self.hash(key);
        self.parts[Index::<V>::part_of_hash(hash)].get(hash, key)
    }

    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let hash = self.hash(key);
        self.parts[Index::<V>::part_of_hash(hash)].get_mut(hash, key)
    }

    pub(crate) fn insert(&mut self, key: &[u8], value: V) -> Option<V> {
        let hash = self.hash(key);
        let hasher = &self.hasher;
        let part = &mut self.parts[Index::<V>::part_of_hash(hash)];
        let old = part.insert(hash, key, value, |key| hasher.hash_one(key));
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        let hash = self.hash(key);
        let old = self.parts[Index::<V>::part_of_hash(hash)].remove(hash, key);
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
    use std::collections::BTreeMap;

    #[test]
    fn behaves_like_one_map() {
        let mut index = Index::default();
        let mut model = std::collections::BTreeMap::new();
        // A prefetch is only a hint: on parts with no slots yet, on present and absent keys.
        index.prefetch(b"nothing here yet");
        for i in 0..5000u32 {
            let key: Box<[u8]> = (i % 1500).to_le_bytes().into();
            index.prefetch(&key);
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
        let used = index.parts.iter().filter(|p| p.len > 0).count();
        assert!(used > 200, "keys spread over the parts ({used} used)");
    }

    /// Checks a part's invariants and that it holds exactly `model`.
    fn check_part(part: &Part<u32>, model: &BTreeMap<Vec<u8>, u32>, hash_of: impl Fn(&[u8]) -> u64) {
        assert!(part.ctrl.is_empty() || part.ctrl.len().is_power_of_two());
        assert_eq!(part.ctrl.len(), part.slots.len());
        let full = part.ctrl.iter().filter(|&&c| c >= FULL).count();
        let deleted = part.ctrl.iter().filter(|&&c| c == DELETED).count();
        assert_eq!((full, deleted), (part.len, part.deleted));
        assert!(
            part.ctrl.is_empty() || part.ctrl.contains(&EMPTY),
            "a probe always ends"
        );
        for (c, slot) in part.ctrl.iter().zip(part.slots.iter()) {
            assert_eq!(*c >= FULL, slot.is_some());
            if let Some((key, _)) = slot {
                assert_eq!(*c, Part::<u32>::tag(hash_of(key)));
            }
        }
        let mut all: Vec<_> = part.iter().map(|(k, v)| (k.to_vec(), *v)).collect();
        all.sort();
        assert_eq!(
            all,
            model.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>()
        );
        for (key, value) in model {
            assert_eq!(part.get(hash_of(key), key), Some(value));
        }
    }

    proptest::proptest! {
        /// Inserts, overwrites and removes in a small key space, with a hash that sends many
        /// keys to the same home slot and tag: long probe runs, deleted slots reused and
        /// cleared by rehashing in place, growth, and lookups past deleted slots.
        #[test]
        fn a_part_agrees_with_a_btreemap(
            ops in proptest::collection::vec((0u8..3, 0u8..48, proptest::prelude::any::<u32>()), 1..600),
            spread in 1u64..9,
        ) {
            let hash_of = |key: &[u8]| {
                let k = key[0] as u64 % spread;
                k | (k << 49) | ((key.len() as u64) << 8)
            };
            let mut part = Part::with_capacity(0);
            let mut model = BTreeMap::new();
            for (op, k, value) in ops {
                // Keys of 1 to 40 bytes: inline and boxed.
                let key: Vec<u8> = std::iter::repeat_n(k, 1 + (k as usize * 7) % 40).collect();
                let hash = hash_of(&key);
                match op {
                    0 => assert_eq!(part.remove(hash, &key), model.remove(&key)),
                    1 => {
                        if let Some(v) = part.get_mut(hash, &key) {
                            *v = value;
                        }
                        if let Some(v) = model.get_mut(&key) {
                            *v = value;
                        }
                    }
                    _ => assert_eq!(part.insert(hash, &key, value, hash_of), model.insert(key, value)),
                }
                check_part(&part, &model, hash_of);
            }
        }
    }

    #[test]
    fn churn_keeps_a_part_from_growing() {
        // Removing keys and inserting others forever leaves deleted slots behind; inserts reuse
        // some, and rehashing in place clears the rest instead of doubling the table.
        let hash_of =
            |key: &[u8]| u64::from_le_bytes(key.try_into().unwrap()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut part = Part::with_capacity(0);
        let mut model = BTreeMap::new();
        const LIVE: u64 = 3000;
        for i in 0..200_000u64 {
            let key = i.to_le_bytes();
            part.insert(hash_of(&key), &key, i as u32, hash_of);
            model.insert(key.to_vec(), i as u32);
            if i >= LIVE {
                let old = (i - LIVE).to_le_bytes();
                assert_eq!(part.remove(hash_of(&old), &old), model.remove(&old[..]));
            }
        }
        check_part(&part, &model, hash_of);
        assert!(
            part.ctrl.len() <= 8192,
            "{} slots for {LIVE} keys",
            part.ctrl.len()
        );
    }

    #[test]
    fn rehashing_clears_deleted_slots_in_place_unless_half_full() {
        // Every key has home slot 0: removing all but the last of a run leaves deleted slots.
        let hash_of = |key: &[u8]| (key[0] as u64) << 49;
        let mut part = Part::with_capacity(0);
        let mut model = BTreeMap::new();
        for k in 0..12u8 {
            part.insert(hash_of(&[k]), &[k], k as u32, hash_of);
            model.insert(vec![k], k as u32);
        }
        for k in 0..9u8 {
            assert_eq!(part.remove(hash_of(&[k]), &[k]), model.remove(&[k][..]));
        }
        let slots = part.ctrl.len();
        assert_eq!((part.len, part.deleted, slots), (3, 9, 16));
        part.rehash(hash_of);
        assert_eq!((part.len, part.deleted, part.ctrl.len()), (3, 0, slots));
        check_part(&part, &model, hash_of);
        for k in 20..24u8 {
            part.insert(hash_of(&[k]), &[k], k as u32, hash_of);
            model.insert(vec![k], k as u32);
        }
        part.rehash(hash_of);
        assert_eq!(part.ctrl.len(), slots * 2, "7 live keys of 16 slots: grows");
        check_part(&part, &model, hash_of);
    }

    #[test]
    fn a_slot_is_as_large_as_its_key_and_value() {
        // The `Option` costs nothing: the key's tag has room for `None`.
        assert_eq!(
            std::mem::size_of::<Option<(Key, u64)>>(),
            std::mem::size_of::<(Key, u64)>()
        );
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
