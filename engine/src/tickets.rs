//! Requests waiting for their answers, by ticket: a slab whose ids carry a generation.
//!
//! A shard keeps every request it has not answered yet (the runtime's replies), and a network
//! connection every request it has passed to a shard (the server's waiting tags). Both insert
//! once and remove once per request, hundreds of thousands of times a second on one thread; a
//! `BTreeMap` and a hash map cost 3-5% of a loaded leader's shard thread there. Here a ticket
//! is a slot index and the slot's generation: insert and remove are an index into a vector, and
//! a ticket whose request was already removed (a late or repeated answer) never reaches the
//! request that reuses its slot.
//!
//! Memory: as many slots as requests were ever waiting at once; freed slots are reused, most
//! recently freed first (their memory is the likeliest to be cached).

/// Requests waiting for answers, each under its own ticket.
#[derive(Debug)]
pub struct Tickets<T> {
    slots: Vec<Slot<T>>,
    /// Indexes of empty slots.
    free: Vec<u32>,
    len: usize,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Default for Tickets<T> {
    fn default() -> Self {
        Tickets {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

fn split(ticket: u64) -> (usize, u32) {
    ((ticket & u32::MAX as u64) as usize, (ticket >> 32) as u32)
}

impl<T> Tickets<T> {
    /// Keeps `value` and returns its ticket (never 0, which protocols may keep for "no id";
    /// unique among the tickets of waiting values, and unequal to any ticket of the same slot
    /// for the next 2^32 - 1 uses of it).
    pub fn insert(&mut self, value: T) -> u64 {
        self.len += 1;
        let index = match self.free.pop() {
            Some(index) => index as usize,
            None => {
                let index = self.slots.len();
                assert!(index < u32::MAX as usize, "fewer than 2^32 requests wait at once");
                self.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                index
            }
        };
        let slot = &mut self.slots[index];
        debug_assert!(slot.value.is_none());
        slot.value = Some(value);
        ((slot.generation as u64) << 32) | index as u64
    }

    /// The value under `ticket`, taken out; `None` if it was taken already (or never given).
    pub fn remove(&mut self, ticket: u64) -> Option<T> {
        let (index, generation) = split(ticket);
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let value = slot.value.take()?;
        // Generations skip 0, so that no ticket is 0.
        slot.generation = slot.generation.wrapping_add(1).max(1);
        self.free.push(index as u32);
        self.len -= 1;
        Some(value)
    }

    /// The value under `ticket`, if it still waits.
    pub fn get(&self, ticket: u64) -> Option<&T> {
        let (index, generation) = split(ticket);
        let slot = self.slots.get(index)?;
        (slot.generation == generation).then_some(slot.value.as_ref()?)
    }

    /// The value under `ticket`, if it still waits, to change.
    pub fn get_mut(&mut self, ticket: u64) -> Option<&mut T> {
        let (index, generation) = split(ticket);
        let slot = self.slots.get_mut(index)?;
        (slot.generation == generation).then_some(slot.value.as_mut()?)
    }

    /// Every waiting value, to change.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().filter_map(|slot| slot.value.as_mut())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every waiting value with its ticket.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            let value = slot.value.as_ref()?;
            Some((((slot.generation as u64) << 32) | index as u64, value))
        })
    }

    /// Takes every waiting value out (their tickets become stale).
    pub fn drain(&mut self) -> Vec<T> {
        let tickets: Vec<u64> = self.iter().map(|(ticket, _)| ticket).collect();
        tickets
            .into_iter()
            .map(|ticket| self.remove(ticket).expect("a listed ticket waits"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_removed_tickets_slot_is_reused_under_a_new_ticket() {
        let mut tickets = Tickets::default();
        let a = tickets.insert("a");
        let b = tickets.insert("b");
        assert_ne!(a, b);
        assert_eq!(tickets.remove(a), Some("a"));
        assert_eq!(tickets.remove(a), None, "answered twice");
        let c = tickets.insert("c");
        assert_eq!(
            c & u32::MAX as u64,
            a & u32::MAX as u64,
            "the freed slot is reused"
        );
        assert_ne!(c, a);
        assert_eq!(
            tickets.remove(a),
            None,
            "a late answer does not reach the new request"
        );
        assert_eq!(tickets.get(c), Some(&"c"));
        assert_eq!(tickets.len(), 2);
        assert_eq!(tickets.remove(u64::MAX), None, "a ticket never given");
        let mut left = tickets.drain();
        left.sort();
        assert_eq!(left, vec!["b", "c"]);
        assert!(tickets.is_empty());
        assert_eq!(tickets.remove(b), None);
    }

    #[test]
    fn no_ticket_is_zero_even_when_a_generation_wraps() {
        let mut tickets = Tickets::default();
        let first = tickets.insert('a');
        tickets.slots[0].generation = u32::MAX;
        let last = (u32::MAX as u64) << 32;
        assert_eq!(tickets.remove(first), None, "the generation moved on");
        assert_eq!(tickets.remove(last), Some('a'));
        let next = tickets.insert('b');
        assert_eq!(next, 1 << 32, "generation 0 is skipped");
        assert_ne!(next, 0);
    }

    proptest::proptest! {
        #[test]
        fn tickets_agree_with_a_map(ops in proptest::collection::vec((proptest::prelude::any::<bool>(), 0usize..64), 1..400)) {
            let mut tickets = Tickets::default();
            let mut model = HashMap::new();
            // Every ticket ever given, to try stale ones too.
            let mut given = Vec::new();
            for (n, (insert, pick)) in ops.into_iter().enumerate() {
                if insert {
                    let ticket = tickets.insert(n);
                    assert!(model.insert(ticket, n).is_none(), "tickets of waiting values are unique");
                    given.push(ticket);
                } else if !given.is_empty() {
                    let ticket = given[pick % given.len()];
                    if pick % 3 == 0 {
                        // Changed in place, stale tickets reaching nothing.
                        if let Some(value) = tickets.get_mut(ticket) {
                            *value += 1000;
                        }
                        if let Some(value) = model.get_mut(&ticket) {
                            *value += 1000;
                        }
                        assert_eq!(tickets.get(ticket), model.get(&ticket));
                    } else {
                        assert_eq!(tickets.remove(ticket), model.remove(&ticket));
                    }
                }
                if n % 50 == 49 {
                    tickets.values_mut().for_each(|value| *value += 1);
                    model.values_mut().for_each(|value| *value += 1);
                }
                assert_eq!(tickets.len(), model.len());
                let mut all: Vec<_> = tickets.iter().map(|(t, v)| (t, *v)).collect();
                let mut expected: Vec<_> = model.iter().map(|(t, v)| (*t, *v)).collect();
                all.sort();
                expected.sort();
                assert_eq!(all, expected);
            }
        }
    }
}
