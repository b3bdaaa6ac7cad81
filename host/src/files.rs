//! Opening the files a user or a plugin names: regular files only, opened without blocking.
//!
//! A path may name something that is not a file: opening a FIFO for reading waits for a
//! writer (forever, if none comes), and a device such as `/dev/zero` never ends. Both are
//! refused here, naming what they are, before anything waits or reads; every input the host
//! reads (audio, configs, models, checkpoints, plugins, predictions) comes through this
//! module.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// What a path that is not a regular file is, for an error message ("is a FIFO ...").
fn kind_of(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    if t.is_dir() {
        return Some("a folder");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("a FIFO (named pipe)");
        }
        if t.is_char_device() {
            return Some("a character device");
        }
        if t.is_block_device() {
            return Some("a block device");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    Some("a special file")
}

/// The error for what `meta` describes where a regular file was needed (`None` for a
/// regular file); a folder keeps [`io::ErrorKind::IsADirectory`] so that callers can say so
/// in their own words.
fn not_a_file(meta: &Metadata) -> Option<io::Error> {
    let kind = kind_of(meta)?;
    let error_kind = if meta.is_dir() {
        io::ErrorKind::IsADirectory
    } else {
        io::ErrorKind::InvalidInput
    };
    Some(io::Error::new(
        error_kind,
        format!("is {kind}, not a regular file"),
    ))
}

/// For paths that may be a file or a folder: why `path` is neither (missing, or a FIFO, a
/// device, a socket), as an error to report.
pub fn neither_file_nor_folder(path: &Path) -> io::Error {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let kind = kind_of(&meta).unwrap_or("a file");
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("is {kind}, not a regular file or folder"),
            )
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            io::Error::new(io::ErrorKind::NotFound, "no such file or folder")
        }
        Err(e) => e,
    }
}

/// Checks that an open `file` is a regular file and puts it back in blocking mode (it was
/// opened non-blocking so that a FIFO could not stall the open itself).
pub fn ensure_regular(file: &File) -> io::Result<()> {
    if let Some(e) = not_a_file(&file.metadata()?) {
        return Err(e);
    }
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this `File` owns, reading then setting its flags.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Non-blocking open flags (a FIFO opens at once instead of waiting for a writer).
#[cfg(unix)]
pub const OPEN_NONBLOCK: i32 = libc::O_NONBLOCK;

/// `path` opened for reading, refused unless it is a regular file.
pub fn open(path: &Path) -> io::Result<File> {
    // stat never blocks, and names a socket (which `open` refuses with an obscure ENXIO).
    if let Some(e) = not_a_file(&std::fs::metadata(path)?) {
        return Err(e);
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(OPEN_NONBLOCK);
    }
    let file = options.open(path)?;
    // The path may have been replaced between the stat and the open.
    ensure_regular(&file)?;
    Ok(file)
}

/// The whole of the regular file `path`.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = open(path)?;
    let mut bytes = Vec::with_capacity(file.metadata().map_or(0, |m| m.len() as usize));
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The whole of the regular file `path`, at most `max_bytes` of it: longer is an error
/// (checked from its size before reading, and while reading, in case it grows).
pub fn read_at_most(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let file = open(path)?;
    let len = file.metadata()?.len();
    let too_big = |len: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the limit of {max_bytes} bytes"),
        )
    };
    if len > max_bytes {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The whole of the regular file `path` as UTF-8 text.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text: {}", e.utf8_error()),
        )
    })
}

/// Whether the output `path` is a device or a pipe (`/dev/null`, `/dev/stdout`, a FIFO,
/// bash's `>(...)`): written into, never renamed over. A rename would replace it (as root,
/// it replaced `/dev/null` itself with a file), and its folder may not take a temporary
/// file (`/dev/fd`). A regular file or a new path is replaced by a rename, so that a reader
/// never sees half a file; a folder is an error.
fn is_stream(path: &Path) -> io::Result<bool> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
        Ok(meta) => match not_a_file(&meta) {
            Some(folder) if meta.is_dir() => Err(folder),
            other => Ok(other.is_some()),
        },
    }
}

/// The file an output `path` names: a symbolic link's target (`/dev/stdout` redirected to a
/// file is a link to it; a rename would replace the link instead of writing the file).
fn resolved(path: &Path) -> PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

/// Where to write the output `path` before [`persist`]: beside the file it names (same file
/// system, so the rename is atomic), or the system's temporary folder for a stream.
pub fn temp_dir_for(path: &Path) -> io::Result<PathBuf> {
    let path = &resolved(path);
    if is_stream(path)? {
        return Ok(std::env::temp_dir());
    }
    Ok(path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf())
}

/// A temporary file in [`temp_dir_for`] `path`.
pub fn temp_file_for(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::NamedTempFile::new_in(temp_dir_for(path)?)
}

/// Puts the finished temporary file at `path`: renamed into place (readable by all, 0644),
/// or copied into a stream ([`is_stream`]). The temporary file is gone afterwards either
/// way.
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> io::Result<()> {
    let path = &resolved(path);
    if is_stream(path)? {
        let mut out = std::fs::OpenOptions::new().write(true).open(path)?;
        return io::copy(&mut tmp.reopen()?, &mut out).map(|_| ());
    }
    // NamedTempFile is created 0600; outputs are files to read and share.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map(|_| ()).map_err(|e| e.error)
}

/// `$EARSHOT_HOME` (models, data, caches), default ~/.cache/earshot. Here, at the bottom,
/// because configs, the encoder cache and the plugin cache all resolve paths under it.
pub fn earshot_home() -> std::path::PathBuf {
    std::env::var_os("EARSHOT_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/earshot")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn regular_files_are_read_and_everything_else_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read_to_string(&file).unwrap(), "hello");
        assert_eq!(read_at_most(&file, 5).unwrap(), b"hello");
        let e = read_at_most(&file, 4).unwrap_err().to_string();
        assert!(e.contains("5 bytes, more than the limit of 4"), "{e}");

        let e = open(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::IsADirectory);
        let e = read(Path::new("/dev/zero")).unwrap_err().to_string();
        assert_eq!(e, "is a character device, not a regular file");
        let e = neither_file_nor_folder(Path::new("/dev/null")).to_string();
        assert!(
            e.contains("character device, not a regular file or folder"),
            "{e}"
        );
        let e = neither_file_nor_folder(&dir.path().join("missing")).to_string();
        assert_eq!(e, "no such file or folder");
        let e = read_to_string(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[cfg(unix)]
    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Reads everything written to the FIFO `path` on another thread.
    #[cfg(unix)]
    fn drain(path: &Path) -> std::thread::JoinHandle<String> {
        let path = path.to_path_buf();
        std::thread::spawn(move || std::fs::read_to_string(path).unwrap())
    }

    /// A file is replaced by a rename; a pipe or device given as the output (`/dev/null`,
    /// `/dev/stdout`, a FIFO) gets the bytes and stays what it is. (A FIFO stands for
    /// `/dev/null` here, so that a regression cannot replace the machine's `/dev/null`.)
    #[cfg(unix)]
    #[test]
    fn outputs_replace_files_and_stream_into_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let put = |content: &str, path: &Path| {
            let tmp = temp_file_for(path)?;
            std::fs::write(tmp.path(), content).unwrap();
            let tmp_path = tmp.path().to_path_buf();
            let r = persist(tmp, path);
            assert!(!tmp_path.exists(), "the temporary file is gone");
            r
        };
        let out = dir.path().join("out.txt");
        put("one", &out).unwrap();
        put("two", &out).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "two");
        let fifo = dir.path().join("pipe");
        mkfifo(&fifo);
        let reader = drain(&fifo);
        put("streamed", &fifo).unwrap();
        // Checked before joining: had the FIFO been renamed over, the reader would wait.
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(reader.join().unwrap(), "streamed");
        let e = put("x", dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::IsADirectory);
        // Through a link: the file it names is written, the link stays.
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        put("five", &link).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "five");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            3,
            "out, pipe, link"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.wav");
        mkfifo(&fifo);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(read(&fifo).map_err(|e| e.to_string())));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO must not wait for a writer");
        assert_eq!(
            got.unwrap_err(),
            "is a FIFO (named pipe), not a regular file"
        );
    }
}
