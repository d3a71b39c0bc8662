//! Fleet operations (`meshsign admin --all-sites`) against three real dev sites — sg, us-east,
//! tokyo — on loopback, and two-person review from the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::Path;

use common::{meshsign_in, start_dev, start_dev_region};
use serde_json::Value;

const REGIONS: [&str; 3] = ["sg", "us-east", "tokyo"];

fn out(o: &std::process::Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Three dev sites and a fleet config naming their client configs.
fn fleet(dir: &Path) -> Vec<common::DevSite> {
    let sites = REGIONS
        .iter()
        .map(|r| start_dev_region(&dir.join(r), r))
        .collect();
    let mut toml = String::from("[sites]\n");
    for r in REGIONS {
        toml.push_str(&format!("{r} = \"{r}/client.toml\"\n"));
    }
    std::fs::write(dir.join("fleet.toml"), toml).unwrap();
    sites
}

#[test]
fn all_sites_drill_status_trust_and_revoke_on_three_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut sites = fleet(dir);
    let fleet_toml = dir.join("fleet.toml");
    let admin = |args: &[&str]| {
        let mut a = vec!["admin", "--all-sites"];
        a.extend_from_slice(args);
        out(&meshsign_in(dir, &fleet_toml, &a))
    };

    // The drill: every region at once, one row per region, each within the bound.
    let (code, text, err) = admin(&["drill", "--environment", "staging"]);
    assert_eq!(code, 0, "{text}{err}");
    let mut lines = text.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("SITE\tPOLICY\tISSUER\tSIGN REFUSED (ms)"),
        "{text}"
    );
    for r in REGIONS {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("{r}\t")))
            .unwrap_or_else(|| panic!("a row for {r}: {text}"));
        assert!(row.ends_with("\tyes\tok"), "{row}");
    }
    let (code, json, err) = admin(&["drill", "--environment", "production", "--output", "json"]);
    assert_eq!(code, 0, "{json}{err}");
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row["ok"], true, "{row}");
        assert!(row["sign_refused_ms"].as_f64().unwrap() < 1000.0);
        assert!(row["enroll_refused_ms"].as_f64().unwrap() < 1000.0);
    }
    // The bound is enforced: nothing is refused in 0 ms.
    let (code, text, _) = admin(&["drill", "--environment", "staging", "--max-ms", "0"]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(text.matches("\tFAIL").count(), 3, "{text}");

    // Status of every site, each naming its own region.
    let (code, json, err) = admin(&["status", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    let regions: Vec<&str> = rows
        .iter()
        .map(|r| r["result"]["region"].as_str().unwrap())
        .collect();
    assert_eq!(regions, ["sg", "tokyo", "us-east"], "site order: by name");
    for r in &rows {
        assert_eq!(r["result"]["writable"], true);
        assert_eq!(
            r["result"]["environments"][0]["trust_policies"][0]["enabled"],
            true
        );
    }
    let (code, text, _) = admin(&["status"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("SITE\tREGION\tENVIRONMENT\tKIND\tNAME\tSTATE\tDETAIL\n"));
    assert!(
        text.contains("tokyo\ttokyo\tstaging\tkey\trelease@v1\tactive\t"),
        "{text}"
    );

    // Trust disable and enable everywhere.
    let issuer = [
        "--environment",
        "staging",
        "--issuer",
        "https://oidc.meshsign.dev",
    ];
    let (code, text, err) = admin(&[&["trust", "disable"][..], &issuer].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(text.matches("\tdisabled\t").count(), 3, "{text}");
    let (_, json, _) = admin(&["status", "--output", "json"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    for r in &rows {
        let staging = r["result"]["environments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "staging")
            .unwrap();
        assert_eq!(staging["trust_policies"][0]["enabled"], false, "{r}");
    }
    let (code, text, _) = admin(&[&["trust", "enable"][..], &issuer].concat());
    assert_eq!(code, 0);
    assert_eq!(text.matches("\tenabled\t").count(), 3, "{text}");

    // Revoke a job everywhere: one rule per site.
    let (code, json, err) = admin(&[
        "revoke", "--job-id", "run-7001", "--reason", "leaked", "--output", "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r["result"]["rule_id"].as_str().is_some())
    );

    // …and distrust what it already signed, everywhere: each site signs its own list.
    let (code, text, err) = admin(&[
        "distrust",
        "add",
        "--environment",
        "staging",
        "--job-id",
        "run-7001",
        "--reason",
        "leaked",
    ]);
    assert_eq!(code, 0, "{text}{err}");
    assert!(
        text.starts_with("SITE\tREGION\tLIST VERSION\tRULES\n"),
        "{text}"
    );
    for r in REGIONS {
        assert!(text.contains(&format!("{r}\t{r}\t1\t1\n")), "{text}");
        let list = meshsign_in(
            dir,
            &dir.join(format!("{r}/client.toml")),
            &[
                "admin",
                "distrust",
                "list",
                "--environment",
                "staging",
                "--output",
                "json",
            ],
        );
        let rules: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
        assert_eq!(rules[0]["job_id"], "run-7001", "{r}");
    }

    // Issue 25 row 7: stage the IdP's next key fleet-wide. `jwks diff` says, per site, what a
    // new JWKS would add and remove (changing nothing); `jwks set` pins it at every site.
    let next = meshsign_certs_dev::OidcIssuer::generate(
        "https://oidc.meshsign.dev",
        "next-1",
        meshsign_certs_dev::JwtAlg::Es256,
    )
    .unwrap();
    std::fs::write(dir.join("next.jwks.json"), next.jwks().to_string()).unwrap();
    let jwks = [
        "--environment",
        "production",
        "--issuer",
        "https://oidc.meshsign.dev",
        "--file",
        "next.jwks.json",
    ];
    let (code, json, err) =
        admin(&[&["trust", "jwks", "diff", "--output", "json"][..], &jwks].concat());
    assert_eq!(code, 0, "{json}{err}");
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 3, "{json}");
    for r in &rows {
        assert_eq!(r["result"]["added"], serde_json::json!(["next-1"]), "{r}");
        assert_eq!(r["result"]["removed"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(r["result"]["kept"], serde_json::json!([]), "{r}");
    }
    let (code, text, err) = admin(&[&["trust", "jwks", "set"][..], &jwks].concat());
    assert_eq!(code, 0, "{text}{err}");
    assert_eq!(text.matches("next-1").count(), 3, "{text}");
    let (_, json, _) = admin(&[&["trust", "jwks", "diff", "--output", "json"][..], &jwks].concat());
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert!(
        rows.iter()
            .all(|r| r["result"]["kept"] == serde_json::json!(["next-1"])),
        "{json}"
    );
    let one = out(&meshsign_in(
        dir,
        &dir.join("sg/client.toml"),
        &[&["admin", "trust", "jwks", "diff"][..], &jwks].concat(),
    ));
    assert_eq!(one.1, "ADDED\tREMOVED\tKEPT\n-\t-\tnext-1\n", "{one:?}");

    // Only the fleet verbs.
    let (code, _, err) = admin(&["key", "list", "--environment", "staging"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--all-sites works with"), "{err}");

    // A site down: the others still answer, the row says what failed, the exit code says so.
    drop(sites.remove(1)); // us-east (sites are started in REGIONS order)
    let (code, text, err) = admin(&["status"]);
    assert_eq!(code, 4, "{text}{err}");
    assert!(text.contains("us-east\tus-east\tERROR: "), "{text}");
    assert!(text.contains("sg\tsg\tstaging\tkey\t"), "{text}");
    assert!(err.contains("failed at: us-east"), "{err}");
    // …and a drill then changes nothing anywhere: no site disables a policy.
    let (code, _, _) = admin(&["drill", "--environment", "staging"]);
    assert_ne!(code, 0);
    let (_, json, _) = admin(&["status", "--output", "json"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    let up: Vec<&Value> = rows.iter().filter(|r| r.get("result").is_some()).collect();
    assert_eq!(up.len(), 2);
    for r in up {
        for e in r["result"]["environments"].as_array().unwrap() {
            assert_eq!(e["trust_policies"][0]["enabled"], true, "{r}");
        }
    }
    let audit = common::audit_entries(dir, &dir.join("sg/client.toml"));
    let disables = audit
        .iter()
        .filter(|e| e["rpc"] == "Admin.DisableTrustPolicy")
        .count();
    assert_eq!(
        disables, 4,
        "three drills and one trust disable; none after the outage"
    );
}

#[test]
fn two_person_review_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let site_dir = dir.join("site");
    // Made once without review (a dev site), then review turned on as a real site has it.
    drop(start_dev(&site_dir));
    let site_toml = site_dir.join("site.toml");
    let text = std::fs::read_to_string(&site_toml).unwrap();
    std::fs::write(&site_toml, text.replacen("operations = []", "", 1)).unwrap();
    let _site = start_dev(&site_dir);
    let alice = site_dir.join("client.toml");
    let bob = site_dir.join("client-2.toml");
    let text = std::fs::read_to_string(&alice).unwrap();
    std::fs::write(
        &bob,
        text.replace("pki/admin.pem", "pki/admin-2.pem")
            .replace("pki/admin.key.pem", "pki/admin-2.key.pem"),
    )
    .unwrap();
    let disable = [
        "admin",
        "key",
        "disable",
        "--environment",
        "production",
        "--alias",
        "release",
    ];

    // Proposed: exit 5, the id and what to do next on stderr, nothing changed.
    let (code, _, err) = out(&meshsign_in(dir, &alice, &disable));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("review_required: proposal p-"), "{err}");
    assert!(err.contains("meshsign admin review approve p-"), "{err}");
    let (code, json, _) = out(&meshsign_in(
        dir,
        &alice,
        &["admin", "review", "list", "--output", "json"],
    ));
    assert_eq!(code, 0);
    let list: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["state"], "pending");
    let id = list[0]["id"].as_str().unwrap().to_string();

    // Self-approval refused (exit 3); the second admin approves; the proposer repeats.
    let (code, _, err) = out(&meshsign_in(
        dir,
        &alice,
        &["admin", "review", "approve", &id],
    ));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("review_self_approval"), "{err}");
    let (code, text, err) = out(&meshsign_in(
        dir,
        &bob,
        &["admin", "review", "approve", &id],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(text.starts_with("PROPOSAL\tSTATE\t"), "{text}");
    assert!(
        text.contains(&format!("{id}\tapproved\tDisableKey")),
        "{text}"
    );
    let (code, text, err) = out(&meshsign_in(dir, &alice, &disable));
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("\trelease\tecdsa-p256-sha256\tdisabled\t"),
        "{text}"
    );
}

/// Issue 28: one runner registered, listed and revoked at every region at once; each site
/// keeps its own registry.
#[test]
fn all_sites_register_list_and_revoke_a_runner() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _sites = fleet(dir);
    let fleet_toml = dir.join("fleet.toml");
    let (code, _, err) = out(&meshsign_in(
        dir,
        &dir.join("sg/client.toml"),
        &["runner", "init", "--backend", "file", "--dir", "runner"],
    ));
    assert_eq!(code, 0, "{err}");
    let admin = |args: &[&str]| {
        let mut a = vec!["admin", "--all-sites"];
        a.extend_from_slice(args);
        out(&meshsign_in(dir, &fleet_toml, &a))
    };
    let (code, text, err) = admin(&[
        "runner",
        "register",
        "--request",
        "runner/registration.json",
    ]);
    assert_eq!(code, 0, "{text}{err}");
    let (code, json, err) = admin(&["runner", "list", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), REGIONS.len(), "{json}");
    let fp = rows[0]["result"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    for r in &rows {
        assert_eq!(r["result"][0]["fingerprint"], fp.as_str(), "{r}");
        assert_eq!(r["result"][0]["state"], "registered", "{r}");
    }
    let (code, text, err) = admin(&["runner", "revoke", &fp, "--reason", "stolen"]);
    assert_eq!(code, 0, "{text}{err}");
    for r in REGIONS {
        assert!(
            text.contains(&format!("{r}\t{r}\t{fp}\tfile\trevoked")),
            "{text}"
        );
    }
}
