//! The sync's backend identities: per `(address, port, protocol)`, how many desired frontends
//! use it (and with which flags) and its backend id, in one row.
//!
//! At 100k Services × 10 endpoints there are a million identities. A row is 24 bytes in one
//! vector, found through a hash table of row numbers (4 bytes a bucket): about half of what
//! the two hash maps keyed by identity it replaces took (counts in one, ids in the other).
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use hashbrown::HashTable;

use super::ids::BKey;
use super::WantCount;

#[derive(Debug, Clone)]
struct Row {
    key: BKey,
    /// Its backend id (present in the maps, or allocated for a pending put); 0 = none (ids
    /// are never 0).
    id: u32,
    /// The desired frontends that use it; `users == 0`: not desired.
    want: WantCount,
}

/// Rows live while the identity is desired or has an id.
#[derive(Debug, Clone, Default)]
pub(super) struct Identities {
    rows: Vec<Row>,
    /// Row numbers, hashed by their row's key.
    index: HashTable<u32>,
    hasher: RandomState,
}

impl Identities {
    fn find(&self, key: &BKey) -> Option<usize> {
        let h = self.hasher.hash_one(key);
        self.index
            .find(h, |&i| self.rows[i as usize].key == *key)
            .map(|&i| i as usize)
    }

    fn find_or_insert(&mut self, key: BKey) -> usize {
        if let Some(i) = self.find(&key) {
            return i;
        }
        let i = self.rows.len();
        self.rows.push(Row {
            key,
            id: 0,
            want: WantCount::default(),
        });
        let (rows, hasher) = (&self.rows, &self.hasher);
        self.index
            .insert_unique(hasher.hash_one(key), i as u32, |&j| {
                hasher.hash_one(rows[j as usize].key)
            });
        i
    }

    /// Drop row `i` if it holds nothing (the last row takes its place).
    fn drop_if_empty(&mut self, i: usize) {
        let row = &self.rows[i];
        if row.id != 0 || row.want.users != 0 {
            return;
        }
        if let Ok(e) = self
            .index
            .find_entry(self.hasher.hash_one(row.key), |&j| j as usize == i)
        {
            e.remove();
        }
        let last = self.rows.len() - 1;
        if i != last {
            let h = self.hasher.hash_one(self.rows[last].key);
            if let Some(j) = self.index.find_mut(h, |&j| j as usize == last) {
                *j = i as u32;
            }
        }
        self.rows.swap_remove(i);
    }

    /// How the desired frontends use `key`; `None` when none does.
    pub(super) fn want(&self, key: &BKey) -> Option<WantCount> {
        self.find(key)
            .map(|i| self.rows[i].want)
            .filter(|w| w.users > 0)
    }

    /// `key`'s row when a desired frontend uses it: the row, how it is used, and its backend
    /// id (0: none yet), found with one lookup; [`Identities::set_id_at`] gives the row an
    /// id.
    pub(super) fn wanted(&self, key: &BKey) -> Option<(usize, WantCount, u32)> {
        let i = self.find(key)?;
        let r = &self.rows[i];
        (r.want.users > 0).then_some((i, r.want, r.id))
    }

    /// Row `row` (from [`Identities::wanted`], with no change in between) has backend `id`.
    pub(super) fn set_id_at(&mut self, row: usize, id: u32) {
        if let Some(r) = self.rows.get_mut(row) {
            r.id = id;
        }
    }

    pub(super) fn is_wanted(&self, key: &BKey) -> bool {
        self.want(key).is_some()
    }

    /// One more desired frontend uses `key`, giving it `flags`. True when `key` was not
    /// desired before.
    pub(super) fn add_user(&mut self, key: BKey, flags: u8) -> bool {
        let i = self.find_or_insert(key);
        let w = &mut self.rows[i].want;
        w.add(flags);
        w.users == 1
    }

    /// One desired frontend that used `key` (giving it `flags`) no longer does. True when
    /// `key` is no longer desired.
    pub(super) fn remove_user(&mut self, key: &BKey, flags: u8) -> bool {
        let Some(i) = self.find(key) else {
            return false;
        };
        let w = &mut self.rows[i].want;
        if w.users == 0 {
            return false;
        }
        w.remove(flags);
        if w.users > 0 {
            return false;
        }
        self.drop_if_empty(i);
        true
    }

    /// The backend id of `key`.
    pub(super) fn id(&self, key: &BKey) -> Option<u32> {
        self.find(key)
            .map(|i| self.rows[i].id)
            .filter(|id| *id != 0)
    }

    /// `key` has backend `id` (never 0). The sync gives ids through
    /// [`Identities::set_id_at`].
    #[cfg(test)]
    pub(super) fn set_id(&mut self, key: BKey, id: u32) {
        let i = self.find_or_insert(key);
        self.rows[i].id = id;
    }

    /// `key` has backend `id` unless it has one already (the lowest wins when the maps hold
    /// duplicates).
    pub(super) fn set_id_if_none(&mut self, key: BKey, id: u32) {
        let i = self.find_or_insert(key);
        if self.rows[i].id == 0 {
            self.rows[i].id = id;
        }
    }

    /// Forget the id of `key`.
    pub(super) fn forget_id(&mut self, key: &BKey) {
        if let Some(i) = self.find(key) {
            self.rows[i].id = 0;
            self.drop_if_empty(i);
        }
    }

    /// Forget every id (the maps are read again); what is desired stays.
    pub(super) fn clear_ids(&mut self) {
        self.rows.retain(|r| r.want.users > 0);
        for r in &mut self.rows {
            r.id = 0;
        }
        self.index.clear();
        let (rows, hasher) = (&self.rows, &self.hasher);
        for (i, r) in rows.iter().enumerate() {
            self.index
                .insert_unique(hasher.hash_one(r.key), i as u32, |&j| {
                    hasher.hash_one(rows[j as usize].key)
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::service::backend_flags;

    fn k(n: u32) -> BKey {
        BKey {
            addr: n,
            port: 80,
            proto: 6,
        }
    }

    #[test]
    fn rows_follow_users_and_ids_and_survive_swap_removal() {
        let mut t = Identities::default();
        assert!(t.add_user(k(1), 0));
        assert!(!t.add_user(k(1), backend_flags::REMOTE));
        assert!(t.add_user(k(2), 0));
        assert!(t.add_user(k(3), backend_flags::TERMINATING));
        assert_eq!(
            t.want(&k(1)).map(|w| (w.users, w.flags())),
            Some((2, backend_flags::REMOTE))
        );
        t.set_id(k(2), 7);
        t.set_id_if_none(k(2), 9);
        assert_eq!(t.id(&k(2)), Some(7));
        // k(1): two users; the first removal keeps it.
        assert!(!t.remove_user(&k(1), backend_flags::REMOTE));
        assert_eq!(t.want(&k(1)).map(|w| w.flags()), Some(0));
        assert!(t.remove_user(&k(1), 0));
        assert!(!t.is_wanted(&k(1)));
        assert!(!t.remove_user(&k(1), 0), "not desired any more");
        // Its row went (k(3), the last, moved into it) and the others are still found.
        assert_eq!(t.rows.len(), 2);
        assert!(t.is_wanted(&k(3)));
        assert_eq!(t.id(&k(2)), Some(7));
        // An id keeps a row that no frontend wants.
        assert!(t.remove_user(&k(2), 0));
        assert_eq!(t.id(&k(2)), Some(7));
        t.forget_id(&k(2));
        assert_eq!(t.id(&k(2)), None);
        assert_eq!(t.rows.len(), 1);
        // clear_ids keeps only what is desired.
        t.set_id(k(4), 11);
        t.set_id(k(3), 12);
        t.clear_ids();
        assert_eq!((t.rows.len(), t.id(&k(3)), t.id(&k(4))), (1, None, None));
        assert!(t.is_wanted(&k(3)));
        // Many rows, removed in an order that moves rows around.
        for n in 100..1100 {
            t.add_user(k(n), 0);
            t.set_id(k(n), n);
        }
        for n in (100..1100).step_by(3) {
            assert!(t.remove_user(&k(n), 0));
            t.forget_id(&k(n));
        }
        for n in 100..1100 {
            let kept = (n - 100) % 3 != 0;
            assert_eq!(t.id(&k(n)), kept.then_some(n), "{n}");
            assert_eq!(t.is_wanted(&k(n)), kept, "{n}");
        }
    }
}
