//! README's table of reasons is the vocabulary: every reason has its row, with the meaning the
//! enum gives, and the table names no reason the enum does not have.

use meshsign_evidence::reason::Reason;

#[test]
fn the_readme_table_of_reasons_is_the_vocabulary() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md at the workspace root");
    let table = readme
        .split_once("| reason | meaning |")
        .map(|(_, t)| t.split("\n\n").next().unwrap_or_default())
        .expect("README has a table headed `| reason | meaning |`");
    let rows: Vec<(&str, &str)> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` | "))
        .map(|(word, rest)| (word, rest.trim_end_matches(" |")))
        .collect();
    for r in Reason::ALL {
        let row = rows.iter().find(|(w, _)| *w == r.as_str());
        assert_eq!(
            row.map(|(_, m)| *m),
            Some(r.meaning()),
            "README's reasons table: `{}`",
            r.as_str()
        );
    }
    for (word, _) in &rows {
        assert!(
            Reason::parse(word).is_some(),
            "README names reason `{word}`, which the vocabulary does not have"
        );
    }
}
