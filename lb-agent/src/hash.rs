//! The hash maps and sets of the controller and the sync: std's, with foldhash instead of
//! SipHash. Their keys are small (ids, addresses, object names) and hashed millions of
//! times in a first sync at 100k Services; foldhash's per-process random seed keeps the
//! protection against crafted keys.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
