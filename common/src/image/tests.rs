//! Every image record survives MessagePack the way the image writer and readers use it (`rmp_serde::to_vec_named`
//! to write, `rmp_serde::from_slice` to read): the value read back is the value written, field for field, and
//! writes the same bytes again. A cut encoding never reads as a record, and an encoding from before a field
//! existed reads with that field's default.
//!
//! The strategies build each struct with a literal naming every field, and each enum lists its variants in a
//! match without a wildcard: a field or variant added to `image` fails to compile here until it is generated too.

extern crate std;

use super::*;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use proptest::collection::vec;
use proptest::prelude::*;
use serde::de::DeserializeOwned;

// ---- strategies for the building blocks ---------------------------------------------------------------------

/// Any text, control characters and NUL included (a hostile image has them too).
fn text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..8).prop_map(|c| c.into_iter().collect())
}

fn bytes() -> impl Strategy<Value = ByteBuf> {
    vec(any::<u8>(), 0..40).prop_map(ByteBuf::from)
}

/// A short list: records nest four deep, so lists stay small to keep a case cheap.
fn few<S: Strategy>(s: S) -> proptest::collection::VecStrategy<S> {
    vec(s, 0..3)
}

prop_compose! {
    fn cpu_info()(vendor in text(), xcr0 in any::<u64>(), xsave_size in any::<u32>()) -> CpuInfo {
        CpuInfo { vendor, xcr0, xsave_size }
    }
}

prop_compose! {
    fn vdso_info()(hash in any::<u64>(), build_id in text(), vdso_len in any::<u64>(), vvar_len in any::<u64>(),
                   vvar_vclock_len in any::<u64>(), image in bytes()) -> VdsoInfo {
        VdsoInfo { hash, build_id, vdso_len, vvar_len, vvar_vclock_len, image }
    }
}

prop_compose! {
    fn host_info()(hostname in text(), arch in text(), kernel in text(), glibc in text(), cpu in cpu_info(),
                   vdso in vdso_info()) -> HostInfo {
        HostInfo { hostname, arch, kernel, glibc, cpu, vdso }
    }
}

prop_compose! {
    fn job_info()(name in text(), argv in few(text()), started_unix_ns in any::<u64>(), dir in proptest::option::of(text()),
                  interval_ms in any::<Option<u64>>(), keep in any::<Option<u32>>(),
                  signals in any::<Option<(i32, i32)>>()) -> JobInfo {
        JobInfo { name, argv, started_unix_ns, dir, interval_ms, keep, signals }
    }
}

prop_compose! {
    fn image_header()(vrun_version in text(), created_unix_ns in any::<u64>(), host in host_info(), job in job_info(),
                      reason in text(), processes in any::<u32>()) -> ImageHeader {
        ImageHeader { vrun_version, created_unix_ns, host, job, reason, processes }
    }
}

prop_compose! {
    fn file_id()(path in text(), dev in any::<u64>(), ino in any::<u64>(), size in any::<u64>(), mtime_ns in any::<i64>(),
                 build_id in proptest::option::of(text()), hash in any::<u64>()) -> FileId {
        FileId { path, dev, ino, size, mtime_ns, build_id, hash }
    }
}

prop_compose! {
    fn ids()(pid in any::<i32>(), ppid in any::<i32>(), pgid in any::<i32>(), sid in any::<i32>()) -> Ids {
        Ids { pid, ppid, pgid, sid }
    }
}

prop_compose! {
    fn zombie()(ids in ids(), comm in text(), status in any::<i32>()) -> ZombieImage {
        ZombieImage { ids, comm, status }
    }
}

prop_compose! {
    fn rseq()(area in any::<u64>(), len in any::<u32>(), sig in any::<u32>()) -> Rseq {
        Rseq { area, len, sig }
    }
}

prop_compose! {
    fn altstack()(sp in any::<u64>(), size in any::<u64>(), flags in any::<i32>()) -> AltStack {
        AltStack { sp, size, flags }
    }
}

prop_compose! {
    fn thread()(tid in any::<i32>(), comm in text(), fs_base in any::<u64>(), park_rsp in any::<u64>(),
                clear_child_tid in any::<u64>(), robust_list in any::<u64>(), robust_len in any::<u64>(),
                rseq in proptest::option::of(rseq()), rip in any::<u64>(), rsp in any::<u64>(), sigmask in any::<u64>(),
                altstack in proptest::option::of(altstack()), pending in few(bytes()), xfeatures in any::<u64>(),
                cpu_ns in any::<u64>()) -> ThreadImage {
        ThreadImage {
            tid, comm, fs_base, park_rsp, clear_child_tid, robust_list, robust_len, rseq, rip, rsp, sigmask, altstack,
            pending, xfeatures, cpu_ns,
        }
    }
}

prop_compose! {
    fn posix_timer()(id in any::<i32>(), clock in any::<i32>(), notify in any::<i32>(), signo in any::<i32>(),
                     tid in any::<i32>(), value in any::<u64>(), value_ns in any::<u64>(), interval_ns in any::<u64>(),
                     deadline_ns in any::<u64>()) -> PosixTimer {
        PosixTimer { id, clock, notify, signo, tid, value, value_ns, interval_ns, deadline_ns }
    }
}

prop_compose! {
    fn timers()(itimers in any::<[(u64, u64); 3]>(), posix in few(posix_timer()), cpu_ns in any::<u64>()) -> TimersImage {
        TimersImage { itimers, posix, cpu_ns }
    }
}

fn region_kind() -> impl Strategy<Value = RegionKind> {
    // Adding a variant fails to compile here: list it below too.
    let _all = |k: RegionKind| match k {
        RegionKind::Anon | RegionKind::Heap | RegionKind::Stack | RegionKind::File | RegionKind::SharedAnon
        | RegionKind::Detached | RegionKind::SysvShm | RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock => (),
    };
    prop::sample::select(&[
        RegionKind::Anon,
        RegionKind::Heap,
        RegionKind::Stack,
        RegionKind::File,
        RegionKind::SharedAnon,
        RegionKind::Detached,
        RegionKind::SysvShm,
        RegionKind::Vdso,
        RegionKind::Vvar,
        RegionKind::VvarVclock,
    ][..])
}

fn contents() -> impl Strategy<Value = Contents> {
    let _all = |c: Contents| match c {
        Contents::Pages | Contents::File | Contents::Nothing | Contents::Elsewhere => (),
    };
    prop::sample::select(&[Contents::Pages, Contents::File, Contents::Nothing, Contents::Elsewhere][..])
}

prop_compose! {
    fn region()(start in any::<u64>(), end in any::<u64>(), prot in any::<u32>(), shared in any::<bool>(), kind in region_kind(),
                name in text(), offset in any::<u64>(), file in proptest::option::of(file_id()), vmflags in any::<u32>(),
                contents in contents(), shared_memory in any::<Option<u32>>(), dev in any::<u64>(), ino in any::<u64>(),
                guards in few(any::<(u64, u64)>())) -> Region {
        Region { start, end, prot, shared, kind, name, offset, file, vmflags, contents, shared_memory, dev, ino, guards }
    }
}

prop_compose! {
    fn fd()(fd in any::<i32>(), cloexec in any::<bool>(), file in any::<u32>()) -> FdImage {
        FdImage { fd, cloexec, file }
    }
}

prop_compose! {
    fn ctty()(fd in any::<i32>(), foreground in any::<i32>()) -> Ctty {
        Ctty { fd, foreground }
    }
}

prop_compose! {
    fn watch_path()(fd in any::<i32>(), wd in any::<i32>(), path in text()) -> WatchPath {
        WatchPath { fd, wd, path }
    }
}

prop_compose! {
    fn epoll_item()(fd in any::<i32>(), events in any::<u32>(), data in any::<u64>()) -> EpollItem {
        EpollItem { fd, events, data }
    }
}

fn fixup() -> impl Strategy<Value = FdFixup> {
    let _all = |f: FdFixup| match f {
        FdFixup::Epoll { .. } | FdFixup::PidFd { .. } | FdFixup::RecordLock { .. } => (),
    };
    prop_oneof![
        (any::<i32>(), few(epoll_item())).prop_map(|(epfd, items)| FdFixup::Epoll { epfd, items }),
        any::<(i32, i32, i32, bool)>().prop_map(|(fd, pid, flags, cloexec)| FdFixup::PidFd { fd, pid, flags, cloexec }),
        any::<(i32, bool, u64, u64)>().prop_map(|(fd, write, start, len)| FdFixup::RecordLock { fd, write, start, len }),
    ]
}

prop_compose! {
    fn sigaction()(handler in any::<u64>(), flags in any::<u64>(), restorer in any::<u64>(), mask in any::<u64>()) -> SigAction {
        SigAction { handler, flags, restorer, mask }
    }
}

prop_compose! {
    fn signals()(actions in few(sigaction()), pending in few(bytes())) -> SignalImage {
        SignalImage { actions, pending }
    }
}

prop_compose! {
    fn caps()(effective in any::<u64>(), permitted in any::<u64>(), inheritable in any::<u64>()) -> Caps {
        Caps { effective, permitted, inheritable }
    }
}

prop_compose! {
    fn cap_sets()(effective in any::<u64>(), permitted in any::<u64>(), inheritable in any::<u64>(), ambient in any::<u64>(),
                  bounding in any::<u64>()) -> CapSets {
        CapSets { effective, permitted, inheritable, ambient, bounding }
    }
}

prop_compose! {
    fn seccomp()(mode in any::<u32>(), inherited in any::<u32>(),
                 filters in few((bytes(), any::<bool>()).prop_map(|(prog, log)| SeccompFilter { prog, log }))) -> Seccomp {
        Seccomp { mode, inherited, filters }
    }
}

prop_compose! {
    fn creds()(uid in any::<[u32; 4]>(), gid in any::<[u32; 4]>(), groups in few(any::<u32>()), caps in cap_sets(),
               securebits in any::<u32>(), no_new_privs in any::<bool>(), seccomp in seccomp(), user_ns in any::<bool>(),
               privileged_cwd in any::<bool>()) -> Creds {
        Creds { uid, gid, groups, caps, securebits, no_new_privs, seccomp, user_ns, privileged_cwd }
    }
}

prop_compose! {
    fn rlimit()(resource in any::<u32>(), cur in any::<u64>(), max in any::<u64>()) -> Rlimit {
        Rlimit { resource, cur, max }
    }
}

prop_compose! {
    fn attrs()(cwd in text(), umask in any::<u32>(), rlimits in few(rlimit()), hostname in text(), domainname in text(),
               ns_last_pid in any::<i32>(), monotonic_ns in any::<u64>(), boottime_ns in any::<u64>(), dumpable in any::<i32>(),
               pdeath_sig in any::<i32>(), caps in caps(), creds in proptest::option::of(creds())) -> ProcessAttrs {
        ProcessAttrs {
            cwd, umask, rlimits, hostname, domainname, ns_last_pid, monotonic_ns, boottime_ns, dumpable, pdeath_sig, caps,
            creds,
        }
    }
}

prop_compose! {
    fn mm()(w in any::<[u64; 11]>(), auxv in bytes()) -> MmImage {
        let [start_code, end_code, start_data, end_data, start_brk, brk, start_stack, arg_start, arg_end, env_start, env_end] = w;
        MmImage {
            start_code, end_code, start_data, end_data, start_brk, brk, start_stack, arg_start, arg_end, env_start, env_end,
            auxv,
        }
    }
}

prop_compose! {
    fn shim()(restart_entry in any::<u64>(), restart_stack_top in any::<u64>()) -> ShimImage {
        ShimImage { restart_entry, restart_stack_top }
    }
}

prop_compose! {
    fn process()(pid in any::<i32>(), ppid in any::<i32>(), pgid in any::<i32>(), sid in any::<i32>(), comm in text(),
                 argv in few(text()), exe in file_id(), threads in few(thread()), regions in few(region()), fds in few(fd()),
                 ctty in proptest::option::of(ctty()), watches in few(watch_path()), fixups in few(fixup()),
                 timers in timers(), signals in signals(), attrs in attrs(), mm in mm(), shim in shim()) -> ProcessImage {
        ProcessImage {
            pid, ppid, pgid, sid, comm, argv, exe, threads, regions, fds, ctty, watches, fixups, timers, signals, attrs, mm,
            shim,
        }
    }
}

prop_compose! {
    fn file_lock()(flock in any::<bool>(), write in any::<bool>(), start in any::<u64>(), len in any::<u64>()) -> FileLock {
        FileLock { flock, write, start, len }
    }
}

prop_compose! {
    fn inotify_watch()(wd in any::<i32>(), mask in any::<u32>(), path in text()) -> InotifyWatch {
        InotifyWatch { wd, mask, path }
    }
}

fn file_kind() -> impl Strategy<Value = FileKind> {
    let _all = |k: FileKind| match k {
        FileKind::Unknown
        | FileKind::Regular { .. }
        | FileKind::Dir { .. }
        | FileKind::Device { .. }
        | FileKind::Terminal { .. }
        | FileKind::Outside { .. }
        | FileKind::Pipe { .. }
        | FileKind::Socket { .. }
        | FileKind::Inet { .. }
        | FileKind::PtyMaster { .. }
        | FileKind::PtySlave { .. }
        | FileKind::SignalFd { .. }
        | FileKind::EventFd { .. }
        | FileKind::TimerFd { .. }
        | FileKind::Epoll { .. }
        | FileKind::Inotify { .. }
        | FileKind::PidFd { .. }
        | FileKind::Memory { .. } => (),
    };
    prop_oneof![
        Just(FileKind::Unknown),
        file_id().prop_map(|file| FileKind::Regular { file }),
        text().prop_map(|path| FileKind::Dir { path }),
        text().prop_map(|path| FileKind::Device { path }),
        (text(), any::<u8>()).prop_map(|(path, stream)| FileKind::Terminal { path, stream }),
        (text(), any::<u8>()).prop_map(|(what, stream)| FileKind::Outside { what, stream }),
        any::<(u32, bool)>().prop_map(|(pipe, write)| FileKind::Pipe { pipe, write }),
        any::<u32>().prop_map(|socket| FileKind::Socket { socket }),
        any::<u32>().prop_map(|socket| FileKind::Inet { socket }),
        any::<u32>().prop_map(|pty| FileKind::PtyMaster { pty }),
        any::<u32>().prop_map(|pty| FileKind::PtySlave { pty }),
        any::<u64>().prop_map(|mask| FileKind::SignalFd { mask }),
        any::<(u64, bool)>().prop_map(|(count, semaphore)| FileKind::EventFd { count, semaphore }),
        any::<(i32, i32, u64, u64, u64)>().prop_map(|(clock, settime_flags, value_ns, interval_ns, ticks)| FileKind::TimerFd {
            clock,
            settime_flags,
            value_ns,
            interval_ns,
            ticks
        }),
        (few(epoll_item()), any::<u32>()).prop_map(|(items, owner)| FileKind::Epoll { items, owner }),
        few(inotify_watch()).prop_map(|watches| FileKind::Inotify { watches }),
        any::<i32>().prop_map(|pid| FileKind::PidFd { pid }),
        (any::<u32>(), text(), any::<i32>(), proptest::option::of(text()), any::<u64>(), any::<u64>()).prop_map(
            |(data, name, seals, deleted_from, dev, ino)| FileKind::Memory { data, name, seals, deleted_from, dev, ino }
        ),
    ]
}

prop_compose! {
    fn fs_creds()(uid in any::<u32>(), gid in any::<u32>(), groups in few(any::<u32>())) -> FsCreds {
        FsCreds { uid, gid, groups }
    }
}

prop_compose! {
    fn open_file()(flags in any::<i32>(), pos in any::<u64>(), kind in file_kind(), locks in few(file_lock()),
                   open_as in proptest::option::of(fs_creds())) -> OpenFile {
        OpenFile { flags, pos, kind, locks, open_as }
    }
}

prop_compose! {
    fn pipe()(capacity in any::<u32>(), data in bytes(), fifo in proptest::option::of(text())) -> PipeImage {
        PipeImage { capacity, data, fifo }
    }
}

fn sock_addr() -> impl Strategy<Value = SockAddr> {
    let _all = |a: SockAddr| match a {
        SockAddr::Unnamed | SockAddr::Path(_) | SockAddr::Abstract(_) => (),
    };
    prop_oneof![Just(SockAddr::Unnamed), text().prop_map(SockAddr::Path), bytes().prop_map(SockAddr::Abstract)]
}

prop_compose! {
    fn socket()(kind in any::<i32>(), local in sock_addr(), peer in any::<Option<u32>>(), listening in any::<bool>(),
                queue in few(bytes()), sndbuf in any::<u32>(), rcvbuf in any::<u32>(), shutdown in any::<u8>()) -> SocketImage {
        SocketImage { kind, local, peer, listening, queue, sndbuf, rcvbuf, shutdown }
    }
}

prop_compose! {
    fn tcp()(send_seq in any::<u32>(), recv_seq in any::<u32>(), send_queue in bytes(), unsent in any::<u32>(),
             recv_queue in bytes(), mss in any::<u32>(), tcp_options in any::<u8>(), snd_wscale in any::<u8>(),
             rcv_wscale in any::<u8>(), timestamp in any::<u32>(), window in any::<[u32; 5]>()) -> TcpConnection {
        TcpConnection {
            send_seq, recv_seq, send_queue, unsent, recv_queue, mss, tcp_options, snd_wscale, rcv_wscale, timestamp, window,
        }
    }
}

fn inet_state() -> impl Strategy<Value = InetState> {
    let _all = |s: InetState| match s {
        InetState::Open | InetState::Listening { .. } | InetState::Connected(_) | InetState::Reset => (),
    };
    prop_oneof![
        Just(InetState::Open),
        any::<u32>().prop_map(|backlog| InetState::Listening { backlog }),
        tcp().prop_map(InetState::Connected),
        Just(InetState::Reset),
    ]
}

prop_compose! {
    fn inet()(family in any::<i32>(), kind in any::<i32>(), local in proptest::option::of(text()),
              peer in proptest::option::of(text()), state in inet_state(), options in few(any::<(i32, i32, i32)>())) -> InetSocket {
        InetSocket { family, kind, local, peer, state, options }
    }
}

prop_compose! {
    fn shared_memory()(name in text(), size in any::<u64>(), writer in any::<u32>(), file in any::<Option<u32>>()) -> SharedMemory {
        SharedMemory { name, size, writer, file }
    }
}

prop_compose! {
    fn terminal()(termios in bytes(), rows in any::<u16>(), cols in any::<u16>(), foreground in any::<i32>()) -> TerminalImage {
        TerminalImage { termios, rows, cols, foreground }
    }
}

prop_compose! {
    fn pty()(index in any::<u32>(), termios in bytes(), rows in any::<u16>(), cols in any::<u16>(), input in bytes(),
             output in bytes()) -> PtyImage {
        PtyImage { index, termios, rows, cols, input, output }
    }
}

prop_compose! {
    fn data_image()(size in any::<u64>(), stored in any::<u64>()) -> DataImage {
        DataImage { size, stored }
    }
}

prop_compose! {
    fn ipc_perm()(id in any::<i32>(), key in any::<i32>(), uid in any::<u32>(), gid in any::<u32>(), mode in any::<u32>()) -> IpcPerm {
        IpcPerm { id, key, uid, gid, mode }
    }
}

prop_compose! {
    fn sysv()(shm in few((ipc_perm(), any::<u64>(), any::<u32>()).prop_map(|(perm, size, data)| SysvShm { perm, size, data })),
              sem in few((ipc_perm(), few(any::<u16>())).prop_map(|(perm, values)| SysvSem { perm, values })),
              msg in few((ipc_perm(), any::<u64>(), few((any::<i64>(), bytes())))
                  .prop_map(|(perm, qbytes, messages)| SysvMsgQueue { perm, qbytes, messages }))) -> SysvImage {
        SysvImage { shm, sem, msg }
    }
}

prop_compose! {
    fn bundled()(dev in any::<u64>(), ino in any::<u64>(), path in text(), data in any::<u32>()) -> BundledFile {
        BundledFile { dev, ino, path, data }
    }
}

prop_compose! {
    fn job_image()(processes in few(process()), zombies in few(zombie()), files in few(open_file()), pipes in few(pipe()),
                   sockets in few(socket()), inet in few(inet()), shared_memory in few(shared_memory()),
                   terminal in proptest::option::of(terminal()), ptys in few(pty()), data in few(data_image()), sysv in sysv(),
                   bundle in few(bundled())) -> JobImage {
        JobImage { processes, zombies, files, pipes, sockets, inet, shared_memory, terminal, ptys, data, sysv, bundle }
    }
}

prop_compose! {
    fn summary()(regions in vec((any::<u64>(), any::<u64>()).prop_map(|(stored, zero)| RegionSummary { stored, zero }), 0..8),
                 bytes in any::<u64>()) -> ProcessSummary {
        ProcessSummary { regions, bytes }
    }
}

prop_compose! {
    fn restart_spec()(process in process(), fd_sources in few(any::<i32>()), ctl_fd in any::<i32>(), sock in text(),
                      log in text(), shim in text()) -> RestartSpec {
        RestartSpec { process, fd_sources, ctl_fd, sock, log, shim }
    }
}

// ---- the properties ------------------------------------------------------------------------------------------

/// Written as the image writer writes it and read back as its readers read it: the same record (every field, as
/// Debug shows it: the records have no PartialEq) that writes the same bytes again; and no strict prefix of the
/// bytes (a cut chunk) reads as a record.
fn round_trip<T: Serialize + DeserializeOwned + core::fmt::Debug>(x: &T, cut: prop::sample::Index) -> Result<(), TestCaseError> {
    let b = rmp_serde::to_vec_named(x).map_err(|e| TestCaseError::fail(format!("encoding: {e}")))?;
    let back: T = rmp_serde::from_slice(&b).map_err(|e| TestCaseError::fail(format!("decoding: {e}")))?;
    prop_assert_eq!(format!("{back:?}"), format!("{x:?}"));
    prop_assert_eq!(rmp_serde::to_vec_named(&back).unwrap(), b.clone(), "not the same bytes again");
    let n = cut.index(b.len());
    prop_assert!(rmp_serde::from_slice::<T>(&b[..n]).is_err(), "the first {} of {} bytes read as a record", n, b.len());
    Ok(())
}

/// The encoding of `x` as an image written before its last `fields` existed: the same map without them (the fields
/// that came later are the last ones of their struct, and the encoding keeps field order).
fn without_last<T: Serialize>(x: &T, fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = rmp_serde::to_vec_named(x).unwrap();
    // Every struct here has fewer than 16 fields: a fixmap, its count in the first byte.
    assert_eq!(b[0] & 0xf0, 0x80, "not a fixmap");
    for (name, value) in fields.iter().rev() {
        let mut pair = rmp_serde::to_vec_named(name).unwrap();
        pair.extend_from_slice(value);
        assert!(b.ends_with(&pair), "{name} is not the last field");
        b.truncate(b.len() - pair.len());
        b[0] -= 1;
    }
    b
}

fn enc<T: Serialize>(x: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(x).unwrap()
}

fn same<T: core::fmt::Debug>(a: &T, b: &T) -> Result<(), TestCaseError> {
    prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn image_header_round_trips(x in image_header(), cut in any::<prop::sample::Index>()) {
        round_trip(&x, cut)?;
    }

    #[test]
    fn process_image_round_trips(x in process(), cut in any::<prop::sample::Index>()) {
        round_trip(&x, cut)?;
    }

    #[test]
    fn job_image_round_trips(x in job_image(), cut in any::<prop::sample::Index>()) {
        round_trip(&x, cut)?;
    }

    #[test]
    fn process_summary_round_trips(x in summary(), cut in any::<prop::sample::Index>()) {
        round_trip(&x, cut)?;
    }

    #[test]
    fn restart_spec_round_trips(x in restart_spec(), cut in any::<prop::sample::Index>()) {
        round_trip(&x, cut)?;
    }

    /// Each kind of open file, pipe, socket and System V object alone, so every variant is met often.
    #[test]
    fn parts_round_trip(f in open_file(), s in socket(), i in inet(), v in sysv(), r in region(), x in fixup(),
                        cut in any::<prop::sample::Index>()) {
        round_trip(&f, cut)?;
        round_trip(&s, cut)?;
        round_trip(&i, cut)?;
        round_trip(&v, cut)?;
        round_trip(&r, cut)?;
        round_trip(&x, cut)?;
    }

    /// Hostile bytes never panic the reader: any bytes decode to a record or fail.
    #[test]
    fn any_bytes_decode_or_fail(b in vec(any::<u8>(), 0..256)) {
        let _ = rmp_serde::from_slice::<JobImage>(&b);
        let _ = rmp_serde::from_slice::<ImageHeader>(&b);
        let _ = rmp_serde::from_slice::<ProcessSummary>(&b);
    }

    /// Images from before a field existed read with its default: the job's supervision settings, a timer's
    /// deadline, a region's guard pages, a file's credentials, a process's credentials.
    #[test]
    fn older_images_read_with_defaults(j in job_info(), t in posix_timer(), r in region(), f in open_file(), a in attrs()) {
        let old = without_last(&j, &[("dir", enc(&j.dir)), ("interval_ms", enc(&j.interval_ms)), ("keep", enc(&j.keep)), ("signals", enc(&j.signals))]);
        let want = JobInfo { dir: None, interval_ms: None, keep: None, signals: None, ..j };
        same(&rmp_serde::from_slice::<JobInfo>(&old).unwrap(), &want)?;

        let old = without_last(&t, &[("deadline_ns", enc(&t.deadline_ns))]);
        prop_assert_eq!(rmp_serde::from_slice::<PosixTimer>(&old).unwrap(), PosixTimer { deadline_ns: 0, ..t });

        let old = without_last(&r, &[("guards", enc(&r.guards))]);
        same(&rmp_serde::from_slice::<Region>(&old).unwrap(), &Region { guards: Vec::new(), ..r })?;

        let old = without_last(&f, &[("open_as", enc(&f.open_as))]);
        same(&rmp_serde::from_slice::<OpenFile>(&old).unwrap(), &OpenFile { open_as: None, ..f })?;

        let old = without_last(&a, &[("creds", enc(&a.creds))]);
        same(&rmp_serde::from_slice::<ProcessAttrs>(&old).unwrap(), &ProcessAttrs { creds: None, ..a })?;
    }

    /// `is_detached` is exactly: a memfd, or a file deleted since.
    #[test]
    fn detached_paths(p in text(), memfd in any::<bool>(), deleted in any::<bool>()) {
        prop_assume!(!p.starts_with("memfd:") && !p.ends_with(" (deleted)"));
        let path = format!("{}{p}{}", if memfd { "/memfd:" } else { "/" }, if deleted { " (deleted)" } else { "" });
        prop_assert_eq!(is_detached(&path), memfd || deleted);
    }
}

#[test]
fn devices_are_found_by_number_and_only_they() {
    for (path, major, minor) in DEVICES {
        assert_eq!(device_path(major, minor), Some(path));
    }
    assert_eq!(device_path(8, 0), None, "a disk");
    assert_eq!(device_path(1, 1), None, "/dev/mem");
}
