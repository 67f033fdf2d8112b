//! The key index: a hash map split into 256 parts by key hash. A single map with millions of
//! keys rehashes all of them when it grows, stalling apply for tens of milliseconds (measured:
//! 60 ms p99 spikes in the open-loop cluster benchmark at each doubling); 256 parts each grow
//! on their own, so a growth step moves 1/256 of the keys. Hashing is ahash, keyed at random per
//! process so clients cannot choose colliding keys.

use std::collections::HashMap;

type Part<V> = HashMap<Box<[u8]>, V, ahash::RandomState>;

const PARTS: usize = 256;

pub(crate) struct Index<V> {
    router: ahash::RandomState,
    parts: Box<[Part<V>]>,
    len: usize,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Index::with_capacity(0)
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for Index<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("len", &self.len).finish()
    }
}

impl<V> Index<V> {
    pub(crate) fn with_capacity(capacity: usize) -> Index<V> {
        let per_part = capacity.div_ceil(PARTS);
        Index {
            router: ahash::RandomState::new(),
            parts: (0..PARTS)
                .map(|_| Part::with_capacity_and_hasher(per_part, ahash::RandomState::new()))
                .collect(),
            len: 0,
        }
    }

    fn part(&self, key: &[u8]) -> usize {
        (self.router.hash_one(key) >> 56) as usize
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&V> {
        self.parts[self.part(key)].get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let part = self.part(key);
        self.parts[part].get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: Box<[u8]>, value: V) -> Option<V> {
        let part = self.part(&key);
        let old = self.parts[part].insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        let part = self.part(key);
        let old = self.parts[part].remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Box<[u8]>, &V)> {
        self.parts.iter().flat_map(|p| p.iter())
    }

    pub(crate) fn extend(&mut self, items: impl IntoIterator<Item = (Box<[u8]>, V)>) {
        for (key, value) in items {
            self.insert(key, value);
        }
    }
}

impl<'a, V> IntoIterator for &'a Index<V> {
    type Item = (&'a Box<[u8]>, &'a V);
    type IntoIter = Box<dyn Iterator<Item = (&'a Box<[u8]>, &'a V)> + 'a>;

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
                _ => assert_eq!(index.insert(key.clone(), i), model.insert(key, i)),
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
        let mut all: Vec<_> = index.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        let used = index.parts.iter().filter(|p| !p.is_empty()).count();
        assert!(used > 200, "keys spread over the parts ({used} used)");
    }
}
