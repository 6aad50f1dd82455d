//! How fast `oci::Hasher` hashes, to compare with `openssl speed -evp sha256`
//! on the same machine: `cargo run --release -p berth-oci --example
//! hash_throughput [MiB]`.

use std::time::Instant;

use berth_oci::Algorithm;

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let buf: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let mut h = alg.hasher();
        let start = Instant::now();
        for _ in 0..mib {
            h.update(&buf);
        }
        let d = h.finish();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}: {mib} MiB in {secs:.3} s, {:.1} MB/s ({})",
            alg.as_str(),
            (mib << 20) as f64 / secs / 1e6,
            &d.as_str()[..16]
        );
    }
}
