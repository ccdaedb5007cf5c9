//! A Rust test program for vOS: two threads, a channel, and heap state (a Vec and a HashMap).
//! usage: vos-testprog STEPS. Prints "step N state S" where S digests all state so far.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

fn main() {
    let steps: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let (tx, rx) = mpsc::channel::<u64>();
    let producer = std::thread::spawn(move || {
        for i in 0..steps {
            tx.send(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut v: Vec<u64> = Vec::new();
    let mut m: HashMap<u64, u64> = HashMap::new();
    let mut digest: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..steps {
        let x = rx.recv().unwrap();
        v.push(x);
        *m.entry(x % 13).or_default() += x >> 7;
        digest = (digest ^ x ^ m[&(x % 13)]).wrapping_mul(0x100_0000_01b3);
        let check: u64 = v.iter().fold(0u64, |a, b| a.wrapping_add(*b));
        println!("step {i} state {digest:016x} {check:016x}");
    }
    producer.join().unwrap();
    println!("done");
}
