//! Id allocation for the sync: backend ids (stable per `(address, port, protocol)`, shared
//! between frontends, never 0) and svc ids (stable per frontend, an index into
//! `LB_SVC_STATS`).
//!
//! A freed id is reused only after every never-used id is gone, oldest-freed first, so a
//! conntrack entry that still names a just-removed backend finds it missing rather than
//! meeting a stranger.
use std::collections::{BTreeSet, VecDeque};

use lb_common::Backend4;

use super::Limits;

/// Identity of a backend: what its id stands for. Flags may change in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct BKey {
    pub(super) addr: u32,
    pub(super) port: u16,
    pub(super) proto: u8,
}

impl BKey {
    pub(super) fn of(b: &Backend4) -> Self {
        Self {
            addr: b.addr,
            port: b.port,
            proto: b.proto,
        }
    }
}

/// A set of ids: a bitset for the low ids the allocator hands out (a million ids take
/// 128 KiB), a tree for any far-away id found in the maps.
#[derive(Debug, Clone, Default)]
struct IdSet {
    bits: Vec<u64>,
    far: BTreeSet<u32>,
}

impl IdSet {
    /// Ids below this are kept in the bitset (at most 8 MiB of it).
    const DENSE: u32 = 1 << 26;

    fn insert(&mut self, id: u32) -> bool {
        if id >= Self::DENSE {
            return self.far.insert(id);
        }
        let (w, b) = ((id / 64) as usize, id % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        let had = self.bits[w] & (1 << b) != 0;
        self.bits[w] |= 1 << b;
        !had
    }

    fn remove(&mut self, id: u32) -> bool {
        if id >= Self::DENSE {
            return self.far.remove(&id);
        }
        let (w, b) = ((id / 64) as usize, id % 64);
        match self.bits.get_mut(w) {
            Some(word) if *word & (1 << b) != 0 => {
                *word &= !(1 << b);
                true
            }
            _ => false,
        }
    }

    fn contains(&self, id: u32) -> bool {
        if id >= Self::DENSE {
            return self.far.contains(&id);
        }
        self.bits
            .get((id / 64) as usize)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    /// Every id, ascending.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let dense = self.bits.iter().enumerate().flat_map(|(w, word)| {
            let word = *word;
            (0..64u32)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w as u32 * 64 + b)
        });
        dense.chain(self.far.iter().copied())
    }
}

/// Allocates ids from `start..end`: never-used ids first, then freed ones oldest first.
#[derive(Debug, Clone)]
pub(super) struct IdAlloc {
    start: u64,
    end: u64,
    next: u64,
    used: IdSet,
    freed: VecDeque<u32>,
}

impl IdAlloc {
    pub(super) fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            end,
            next: start,
            used: IdSet::default(),
            freed: VecDeque::new(),
        }
    }

    fn contains(&self, id: u32) -> bool {
        (self.start..self.end).contains(&u64::from(id))
    }

    /// Mark an id found in the maps as used. False if out of range or already used.
    pub(super) fn reserve(&mut self, id: u32) -> bool {
        if !self.contains(id) || !self.used.insert(id) {
            return false;
        }
        self.next = self.next.max(u64::from(id) + 1);
        true
    }

    pub(super) fn alloc(&mut self) -> Option<u32> {
        while self.next < self.end {
            let id = self.next as u32;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        while let Some(id) = self.freed.pop_front() {
            if self.used.insert(id) {
                return Some(id);
            }
        }
        // Gaps below `next` that were never seen (left by an earlier run).
        let mut cand = self.start;
        for u in self.used.iter() {
            match u64::from(u).cmp(&cand) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => cand += 1,
                std::cmp::Ordering::Greater => break,
            }
        }
        if cand < self.end {
            let id = cand as u32;
            self.used.insert(id);
            Some(id)
        } else {
            None
        }
    }

    /// Whether `id` is in use.
    pub(super) fn is_used(&self, id: u32) -> bool {
        self.used.contains(id)
    }

    /// Free `ids` (those in use), ascending: the order they are reused in.
    pub(super) fn free(&mut self, ids: &mut Vec<u32>) {
        ids.sort_unstable();
        ids.dedup();
        for id in ids.drain(..) {
            if self.used.remove(id) {
                self.freed.push_back(id);
            }
        }
    }

    /// Free every used id not in `keep`.
    #[cfg(test)]
    pub(super) fn retain(&mut self, keep: &BTreeSet<u32>) {
        let gone: Vec<u32> = self.used.iter().filter(|id| !keep.contains(id)).collect();
        for id in gone {
            self.used.remove(id);
            self.freed.push_back(id);
        }
    }

    pub(super) fn limit(&self) -> u32 {
        (self.end - self.start).min(u64::from(u32::MAX)) as u32
    }
}

/// The backend id allocator for `l`: ids `1..=l.backend_ids`.
pub(super) fn backend_alloc(l: &Limits) -> IdAlloc {
    IdAlloc::new(1, u64::from(l.backend_ids) + 1)
}

/// The svc id allocator for `l`: ids `0..l.svc_ids`.
pub(super) fn svc_alloc(l: &Limits) -> IdAlloc {
    IdAlloc::new(0, u64::from(l.svc_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(ids: &[u32]) -> BTreeSet<u32> {
        ids.iter().copied().collect()
    }

    fn drain(a: &mut IdAlloc) -> Vec<u32> {
        std::iter::from_fn(|| a.alloc()).collect()
    }

    #[test]
    fn alloc_hands_out_never_used_ids_in_order_then_runs_out() {
        let mut a = IdAlloc::new(1, 4);
        assert_eq!(drain(&mut a), vec![1, 2, 3]);
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn reserve_rejects_out_of_range_and_duplicates_and_skips_reserved_ids() {
        let mut a = IdAlloc::new(1, 6);
        assert!(!a.reserve(0), "below the range");
        assert!(!a.reserve(6), "above the range");
        assert!(a.reserve(2));
        assert!(!a.reserve(2), "already used");
        // Allocation continues after the highest reserved id; the gap below it comes last.
        assert_eq!(drain(&mut a), vec![3, 4, 5, 1]);
    }

    #[test]
    fn freed_ids_are_reused_oldest_first_only_after_never_used_ids_run_out() {
        let mut a = IdAlloc::new(0, 4);
        assert_eq!(a.alloc(), Some(0));
        assert_eq!(a.alloc(), Some(1));
        a.retain(&keep(&[1]));
        // 0 is free, but never-used ids come first.
        assert_eq!(a.alloc(), Some(2));
        a.retain(&keep(&[2]));
        // 1 was freed after 0.
        assert_eq!(a.alloc(), Some(3));
        assert_eq!(drain(&mut a), vec![0, 1]);
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn retain_frees_only_ids_not_kept() {
        let mut a = IdAlloc::new(1, 4);
        assert_eq!(drain(&mut a), vec![1, 2, 3]);
        a.retain(&keep(&[1, 3]));
        assert_eq!(drain(&mut a), vec![2]);
        a.retain(&keep(&[1, 2, 3]));
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn limits_map_to_id_ranges() {
        let l = Limits {
            svc_ids: 2,
            backend_ids: 2,
        };
        assert_eq!(drain(&mut backend_alloc(&l)), vec![1, 2]);
        assert_eq!(drain(&mut svc_alloc(&l)), vec![0, 1]);
        assert_eq!(backend_alloc(&Limits::default()).limit(), u32::MAX);
        assert_eq!(svc_alloc(&l).limit(), 2);
    }
}
