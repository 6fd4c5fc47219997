//! `glued run` caps glibc's malloc arenas ([`glued::cli::limit_malloc_arenas`]):
//! threads that each allocate share [`glued::cli::MALLOC_ARENAS`] arenas
//! instead of making one each. Its own test binary without the test
//! harness, so no thread has allocated before the cap is set.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use std::sync::{Arc, Barrier};

    // The operator's MALLOC_ARENA_MAX would win: this test checks Glued's own cap.
    // SAFETY: no other thread runs yet.
    unsafe { std::env::remove_var("MALLOC_ARENA_MAX") };
    glued::cli::limit_malloc_arenas();
    const THREADS: usize = 8;
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Every thread holds an allocation while all the others do.
                let held = vec![i as u8; 4096];
                barrier.wait();
                held.len()
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let heaps = heaps();
    assert!(
        (1..=glued::cli::MALLOC_ARENAS as usize).contains(&heaps),
        "{THREADS} threads made {heaps} malloc arenas, more than {}",
        glued::cli::MALLOC_ARENAS
    );
    println!("test malloc_arenas_are_capped ... ok ({heaps} arenas for {THREADS} threads)");
}

/// Number of arenas (`<heap nr=…>` elements) in glibc's `malloc_info`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heaps() -> usize {
    let mut buf: *mut libc::c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: open_memstream writes the buffer's address and length into
    // the two locals; the stream is closed before the buffer is read and
    // freed with `free`, as its documentation asks.
    let xml = unsafe {
        let stream = libc::open_memstream(&mut buf, &mut len);
        assert!(!stream.is_null(), "open_memstream");
        assert_eq!(libc::malloc_info(0, stream), 0, "malloc_info");
        libc::fclose(stream);
        let xml = std::slice::from_raw_parts(buf as *const u8, len).to_vec();
        libc::free(buf.cast());
        String::from_utf8(xml).expect("utf-8")
    };
    xml.matches("<heap nr=").count()
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("test malloc_arenas_are_capped ... skipped: not glibc");
}
