//! The layers of host/src hold: ARCHITECTURE.md lists them (lowest first); every `crate::`
//! path in a module's code (its tests module aside) must name a module on a lower layer, and
//! the files and folders inside one folder must not import each other in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use earshot_tests::repo_root;

/// `layer N: a b c   (what they are)` lines of ARCHITECTURE.md, lowest first.
fn layers(doc: &str) -> Vec<(usize, Vec<String>)> {
    doc.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("layer ")?;
            let (n, names) = rest.split_once(':')?;
            let names = names.split('(').next().unwrap_or("");
            Some((
                n.trim().parse().ok()?,
                names.split_whitespace().map(String::from).collect(),
            ))
        })
        .collect()
}

/// A module's code without its tests module (`#[cfg(test)] mod ...` to the end: every test
/// module here is the file's last item) and without comment lines.
fn code(src: &str) -> String {
    let mut end = src.len();
    let mut from = 0;
    while let Some(i) = src[from..].find("#[cfg(test)]") {
        let at = from + i;
        if src[at + "#[cfg(test)]".len()..]
            .trim_start()
            .starts_with("mod ")
        {
            end = at;
            break;
        }
        from = at + 1;
    }
    src[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment after each `prefix` (`prefix::name`, `prefix::{a, b::c}`), with
/// the line it is on.
fn segments_after(code: &str, prefix: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            // `crate::` inside a longer name (`mycrate::`) is not ours.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // Grouped imports may span lines; the first line's names are enough for a
                // one-line group, and multi-line groups are read from the whole text below.
                let body = group.split('}').next().unwrap_or("");
                for part in body.split(',') {
                    let name = part.trim().split("::").next().unwrap_or("").trim();
                    if !name.is_empty() {
                        out.push((name.to_string(), n + 1));
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push((name, n + 1));
                }
            }
        }
    }
    // Multi-line groups: `prefix{` then names on the following lines up to `}`.
    let mut rest = code;
    while let Some(i) = rest.find(&format!("{prefix}{{")) {
        rest = &rest[i + prefix.len() + 1..];
        let body = rest.split('}').next().unwrap_or("");
        if body.contains('\n') {
            let line = code.len() - rest.len();
            let line = code[..line].lines().count();
            for part in body.split(',') {
                let name = part.trim().split("::").next().unwrap_or("").trim();
                if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    out.push((name.to_string(), line));
                }
            }
        }
    }
    out
}

fn rs_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rs_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The unit (top-level file or folder of host/src) a file belongs to.
fn unit_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Upward or same-layer `crate::` paths: (file:line, what it names, why).
fn upward_imports(src: &Path, layer_of: &BTreeMap<String, usize>) -> Vec<String> {
    let mut bad = Vec::new();
    for file in rs_files(src) {
        let unit = unit_of(src, &file);
        if unit == "lib" || unit == "main" {
            continue;
        }
        let Some(&own) = layer_of.get(&unit) else {
            continue;
        };
        let text = code(&std::fs::read_to_string(&file).unwrap());
        for (target, line) in segments_after(&text, "crate::") {
            if target == unit || target == "self" {
                continue;
            }
            let Some(&theirs) = layer_of.get(&target) else {
                continue;
            };
            if theirs >= own {
                bad.push(format!(
                    "{}:{line}: crate::{target} (layer {theirs}) from {unit} (layer {own})",
                    file.strip_prefix(src).unwrap().display()
                ));
            }
        }
    }
    bad
}

/// Cycles among the files and subfolders of each folder (mod.rs, the folder itself, aside).
fn folder_cycles(src: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut folders = vec![src.to_path_buf()];
    while let Some(dir) = folders.pop() {
        let mut siblings = BTreeSet::new();
        let mut files = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                siblings.insert(name);
                folders.push(p);
            } else if name.ends_with(".rs") && name != "mod.rs" && dir != src {
                siblings.insert(name.trim_end_matches(".rs").to_string());
                files.push(p);
            }
        }
        if dir == src {
            continue; // the top level is checked by layer
        }
        let module = dir
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .replace('/', "::");
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let own = file.file_stem().unwrap().to_string_lossy().to_string();
            let text = code(&std::fs::read_to_string(file).unwrap());
            let mut targets = segments_after(&text, "super::");
            targets.extend(segments_after(&text, &format!("crate::{module}::")));
            for (t, _) in targets {
                if t != own && siblings.contains(&t) {
                    edges.entry(own.clone()).or_default().insert(t);
                }
            }
        }
        // Any edge a -> b with a path b -> ... -> a closes a cycle.
        for (a, bs) in &edges {
            for b in bs {
                if let Some(path) = path_between(&edges, b, a) {
                    out.push(format!("{module}: {a} -> {}", path.join(" -> ")));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn path_between(
    edges: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap().clone();
        if last == to {
            return Some(path);
        }
        if !seen.insert(last.clone()) {
            continue;
        }
        for next in edges.get(&last).into_iter().flatten() {
            let mut p = path.clone();
            p.push(next.clone());
            stack.push(p);
        }
    }
    None
}

#[test]
fn host_modules_import_only_lower_layers_and_no_folder_has_a_cycle() {
    let root = repo_root();
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let layers = layers(&doc);
    assert!(
        layers.len() >= 5,
        "ARCHITECTURE.md lists no layers: {layers:?}"
    );
    let src = root.join("host/src");
    let mut layer_of = BTreeMap::new();
    println!("layers of host/src, lowest first (from ARCHITECTURE.md):");
    for (n, names) in &layers {
        println!("  {n}: {}", names.join(" "));
        for name in names {
            assert!(
                layer_of.insert(name.clone(), *n).is_none(),
                "{name} is listed on two layers"
            );
        }
    }
    // Every top-level module is on a layer, and every listed one exists.
    let mut units = BTreeSet::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        let unit = name.trim_end_matches(".rs").to_string();
        if unit != "lib" && unit != "main" {
            units.insert(unit);
        }
    }
    let listed: BTreeSet<String> = layer_of.keys().cloned().collect();
    assert_eq!(
        units, listed,
        "host/src's modules and ARCHITECTURE.md's layer list differ"
    );

    let upward = upward_imports(&src, &layer_of);
    assert!(
        upward.is_empty(),
        "imports of a module on the same or a higher layer:\n  {}",
        upward.join("\n  ")
    );
    let cycles = folder_cycles(&src);
    assert!(
        cycles.is_empty(),
        "import cycles inside a folder:\n  {}",
        cycles.join("\n  ")
    );
}

/// Files of host/src (tests modules aside) that print to stderr themselves.
fn stderr_printers(src: &Path) -> Vec<String> {
    rs_files(src)
        .into_iter()
        .filter(|f| !f.ends_with("cli/printer.rs"))
        .filter(|f| {
            let text = code(&std::fs::read_to_string(f).unwrap());
            text.contains("eprintln!") || text.contains("eprint!")
        })
        .map(|f| f.strip_prefix(src).unwrap().display().to_string())
        .collect()
}

/// Progress, notices, warnings and errors reach stderr through `cli/printer.rs` only (logs go
/// through tracing); stdout is for results.
#[test]
fn only_the_printer_writes_to_stderr() {
    let src = repo_root().join("host/src");
    let others = stderr_printers(&src);
    assert!(
        others.is_empty(),
        "eprintln!/eprint! outside cli/printer.rs: {others:?}"
    );
}

/// The checker itself finds what it is for, on a throwaway tree.
#[test]
fn the_checker_finds_an_upward_import_and_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("low")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod low; pub mod high;").unwrap();
    std::fs::write(src.join("low/mod.rs"), "mod a; mod b;").unwrap();
    std::fs::write(
        src.join("low/a.rs"),
        "use super::b::thing;\n// crate::high in a comment is fine\n",
    )
    .unwrap();
    std::fs::write(
        src.join("low/b.rs"),
        "use super::{a::other, c};\nfn f() { crate::high::g() }\n#[cfg(test)]\nmod tests { use crate::high; }\n",
    )
    .unwrap();
    std::fs::write(src.join("high.rs"), "use crate::{low::a, low::b};\n").unwrap();
    let layer_of: BTreeMap<String, usize> =
        [("low".to_string(), 1), ("high".to_string(), 2)].into();
    let upward = upward_imports(src, &layer_of);
    assert_eq!(upward.len(), 1, "{upward:?}");
    assert!(upward[0].starts_with("low/b.rs:2: crate::high (layer 2) from low (layer 1)"));
    let cycles = folder_cycles(src);
    assert!(cycles.iter().any(|c| c == "low: a -> b -> a"), "{cycles:?}");
}
