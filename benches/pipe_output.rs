//! How the image reaches a pipe: `write(2)` of each 1 MiB read against
//! `vmsplice(2)` of the same buffer, with a reader thread draining the pipe
//! as `hot-clone image | consumer` would (it reads into its own buffer).
//!
//! vmsplice without `SPLICE_F_GIFT` lends the buffer's pages to the pipe:
//! the sender must not reuse the buffer until the reader has consumed them,
//! which a sender cannot observe. The engine reuses a read buffer as soon as
//! `deliver` returns, so a vmsplice output would first have to copy the data
//! into pages it gives away, or wait for the pipe to drain. Here the bench
//! measures the best case for vmsplice (it waits for the reader before it
//! reuses the buffer), to see whether that path is worth building.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::mpsc;

const CHUNK: usize = 1 << 20;
const CHUNKS_PER_ITER: usize = 64;
const PIPE_BYTES: libc::c_int = 1 << 20;

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors from pipe2.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on our own pipe; failure leaves the default size.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    (r, w)
}

/// A reader thread: reads `bytes` and acknowledges each chunk.
fn reader(mut r: File, acks: mpsc::Sender<()>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let mut got = 0;
            while got < CHUNK {
                match r.read(&mut buf[got..]) {
                    Ok(0) => return,
                    Ok(n) => got += n,
                    Err(e) => panic!("{e}"),
                }
            }
            if acks.send(()).is_err() {
                return;
            }
        }
    })
}

fn bench_pipe(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipe_output");
    group.throughput(Throughput::Bytes((CHUNK * CHUNKS_PER_ITER) as u64));
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 7 + 3) as u8).collect();

    group.bench_function("write_1m", |b| {
        let (r, mut w) = pipe();
        let (tx, rx) = mpsc::channel();
        let handle = reader(r, tx);
        b.iter(|| {
            for _ in 0..CHUNKS_PER_ITER {
                w.write_all(&data).unwrap();
            }
            for _ in 0..CHUNKS_PER_ITER {
                rx.recv().unwrap();
            }
        });
        drop(w);
        handle.join().unwrap();
    });

    group.bench_function("vmsplice_1m_wait_for_reader", |b| {
        let (r, w) = pipe();
        let (tx, rx) = mpsc::channel();
        let handle = reader(r, tx);
        b.iter(|| {
            for _ in 0..CHUNKS_PER_ITER {
                let mut sent = 0;
                while sent < CHUNK {
                    let iov = libc::iovec {
                        iov_base: data[sent..].as_ptr() as *mut libc::c_void,
                        iov_len: CHUNK - sent,
                    };
                    // SAFETY: the iovec points into `data`, which outlives
                    // the call and is not modified while the pipe holds it
                    // (we wait for the reader below before the next chunk).
                    let n = unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, 0) };
                    assert!(n > 0, "vmsplice: {}", std::io::Error::last_os_error());
                    sent += n as usize;
                }
                // The pages are lent: wait until the reader consumed them.
                rx.recv().unwrap();
            }
        });
        drop(w);
        handle.join().unwrap();
    });
    group.finish();
}

criterion_group!(benches, bench_pipe);
criterion_main!(benches);
