//! `--flag value` argument parsing shared by the lab's small binaries (`lb-loadgen`,
//! `lb-sockclient`), which take no dependency on a CLI crate.
use std::collections::BTreeMap;

/// The `--flag value` pairs of `args`; `usage` is shown with an unexpected argument.
pub fn flags(args: &[String], usage: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag:?}\n{usage}"))?;
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        out.insert(name.to_owned(), value.clone());
    }
    Ok(out)
}

/// The value of `--name`, parsed; required.
pub fn get<T: std::str::FromStr>(f: &BTreeMap<String, String>, name: &str) -> Result<T, String> {
    let v = f.get(name).ok_or_else(|| format!("--{name} is required"))?;
    v.parse()
        .map_err(|_| format!("--{name}: cannot parse {v:?}"))
}

/// The value of `--name`, parsed, or `default` when it is not given.
pub fn get_or<T: std::str::FromStr>(
    f: &BTreeMap<String, String>,
    name: &str,
    default: T,
) -> Result<T, String> {
    if f.contains_key(name) {
        get(f, name)
    } else {
        Ok(default)
    }
}
