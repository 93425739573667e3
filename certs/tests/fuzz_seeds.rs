//! Runs the fuzz harness (the same function as certs/fuzz's `spiffe_id`
//! target) over the checked-in seed corpus and generated edge cases, so CI
//! exercises it without cargo-fuzz.

use std::path::Path;

#[test]
fn spiffe_id_harness_over_the_seed_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus-seed/spiffe_id");
    let mut n = 0;
    let mut valid = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        certs::fuzzing::spiffe_id(&data);
        if std::str::from_utf8(&data).is_ok_and(|s| s.parse::<certs::SpiffeId>().is_ok()) {
            valid += 1;
        }
        n += 1;
    }
    assert!(
        n >= 15,
        "seed corpus missing: {n} files in {}",
        dir.display()
    );
    assert_eq!(valid, 3, "the corpus holds three valid IDs");
}

#[test]
fn spiffe_id_harness_over_length_limits_and_mutations() {
    let base = b"spiffe://cluster.local/ns/shop/sa/cart";
    // Every single-byte mutation of a valid ID, and every truncation.
    for i in 0..base.len() {
        for b in [
            b'/', b'.', b':', b'@', b'%', b'?', b'#', b'A', b'_', b' ', 0, 0xff,
        ] {
            let mut m = base.to_vec();
            m[i] = b;
            certs::fuzzing::spiffe_id(&m);
        }
        certs::fuzzing::spiffe_id(&base[..i]);
    }
    for len in [254, 255, 256] {
        certs::fuzzing::spiffe_id(format!("spiffe://{}/ns/a/sa/b", "t".repeat(len)).as_bytes());
    }
    for len in [2047, 2048, 2049] {
        let head = "spiffe://td/ns/a/sa/";
        certs::fuzzing::spiffe_id(format!("{head}{}", "s".repeat(len - head.len())).as_bytes());
    }
}
