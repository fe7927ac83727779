//! Input-level rejections: size, encoding, documents, hostile YAML, the CLI corpus,
//! and property tests that nothing panics.

use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

#[test]
fn rejects_oversized_input() {
    let mut big = base().into_bytes();
    big.resize(MAX_SPEC_BYTES + 1, b'#');
    let err = parse(&big, "big.yaml").err();
    assert_eq!(err.as_ref().map(|e| (e.line, e.column)), Some((1, 1)));
    assert!(err.is_some_and(|e| e.reason.contains("larger than the limit of 1048576 bytes")));
}

#[test]
fn rejects_non_utf8_with_position() {
    let err = parse(b"apiVersion: ovl/v1\ncluster:\n  name: d\xe9mo\n", "x").err();
    assert_eq!(
        err.map(|e| (e.line, e.column, e.reason)),
        Some((3, 10, "the spec is not valid UTF-8 text".to_owned()))
    );
}

#[test]
fn rejects_empty_documents() {
    for empty in [
        "",
        "\n\n",
        "---\n",
        "# just a comment\n",
        "~\n",
        "---\n...\n",
    ] {
        assert_rejects(empty, 1, 1, "the spec is empty");
    }
}

#[test]
fn rejects_multiple_documents() {
    assert_rejects(&format!("{}---\n{}", base(), base()), 12, 1, "multiple");
}

#[test]
fn rejects_hostile_yaml() {
    let mut bomb = with_network("").replace(
        "    vni: 4097\n",
        "    vni:\n      - &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        bomb.push_str(&format!(
            "      - &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let err = parse_str(&bomb).err();
    assert!(err.is_some_and(|e| e.reason.contains("parser limit")));
    let deep = with_network("").replace(
        "vni: 4097",
        &format!("vni: {}{}", "[".repeat(10_000), "]".repeat(10_000)),
    );
    let err = parse_str(&deep).err();
    assert!(err.is_some_and(|e| e.reason.contains("limit") && e.line == 13));
}

#[test]
fn error_display_is_file_line_column_reason() {
    let err = parse(b"apiVersion: ovl/v1\nextra: 1\n", "<stdin>").err();
    assert_eq!(
        err.map(|e| e.to_string()),
        Some("<stdin>:2:1: unknown field `extra`, expected one of apiVersion, cluster, nodes, networks".to_owned())
    );
}

// ---------------------------------------------------------------- the CLI corpus

/// Every file in `integration/invalid/` is rejected with the substring and location its
/// EXPECTED.tsv row names, and every file has a row.
#[test]
fn invalid_corpus_matches_expected_tsv() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("integration/invalid");
    let tsv = std::fs::read_to_string(dir.join("EXPECTED.tsv"))
        .unwrap_or_else(|e| panic!("EXPECTED.tsv: {e}"));
    let mut listed = Vec::new();
    for (n, row) in tsv
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let cols: Vec<&str> = row.split('\t').collect();
        let [file, substring, location] = cols[..] else {
            panic!(
                "EXPECTED.tsv:{}: want 3 tab-separated columns: {row:?}",
                n + 1
            );
        };
        let bytes = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let err = match parse(&bytes, file) {
            Ok(_) => panic!("{file}: accepted"),
            Err(e) => e,
        };
        assert!(
            err.reason.contains(substring),
            "{file}: `{err}` lacks `{substring}`"
        );
        if location != "-" {
            assert_eq!(
                format!("{}:{}", err.line, err.column),
                location,
                "{file}: `{err}`"
            );
        }
        assert!(
            err.to_string()
                .starts_with(&format!("{file}:{}:{}: ", err.line, err.column))
        );
        listed.push(file.to_owned());
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|f| f != "EXPECTED.tsv")
        .collect();
    on_disk.sort();
    listed.sort();
    assert_eq!(on_disk, listed, "files and EXPECTED.tsv rows differ");
    assert!(listed.len() >= 34);
}

// ---------------------------------------------------------------- properties

fn check_outcome(result: Result<Spec, SpecError>) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        prop_assert!(e.line >= 1 && e.column >= 1, "{e}");
        prop_assert!(!e.reason.is_empty());
        prop_assert!(
            !e.reason.contains('\n') && !e.reason.contains('\r'),
            "{:?}",
            e.reason
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_outcome(parse(&bytes, "fuzz"))?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[ -~\t\n]{0,400}") {
        check_outcome(parse_str(&text))?;
    }

    /// Mutations of a valid spec reach deep into validation, not only the YAML parser.
    #[test]
    fn mutated_specs_never_panic(
        cut in 0usize..600,
        at in 0usize..600,
        insert in "[-a-z0-9:{}\\[\\],&*!|>#\"' \n./]{0,12}",
    ) {
        let valid = with_network("    encrypted: true\n    addresses:\n      node-a: 10.10.0.1/24\n      node-b: 10.10.0.2/24\n");
        let mut bytes = valid.into_bytes();
        let cut = cut.min(bytes.len());
        bytes.truncate(bytes.len() - cut / 8);
        let at = at.min(bytes.len());
        bytes.splice(at..at, insert.into_bytes());
        check_outcome(parse(&bytes, "mutated"))?;
    }
}
