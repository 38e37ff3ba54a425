package containerd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultNerdctlDataRoot is nerdctl's data root when it runs as root
// (its --data-root); the state directories of its containers are under it.
const DefaultNerdctlDataRoot = "/var/lib/nerdctl"

// networkConfigFile is the file in a state directory that holds the
// container's port mappings (nerdctl ≥ 2.2).
const networkConfigFile = "network-config.json"

// errNoNetworkConfig is a state directory without network-config.json.
var errNoNetworkConfig = errors.New("no " + networkConfigFile)

// ErrRefused marks port data the source will not use: a container made by
// containerd's CRI plugin, or a state directory or network-config.json
// that is not where, or what, nerdctl makes them.
var ErrRefused = errors.New("nerdctl port data refused")

func refused(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrRefused}, args...)...)
}

// checkDataRoot says why root cannot be a data root, or nil.
func checkDataRoot(root string) error {
	if !filepath.IsAbs(root) || filepath.Clean(root) != root {
		return fmt.Errorf("%q is not an absolute, clean path", root)
	}
	return nil
}

// stateDirBeneath returns the state directory dir relative to the data
// root, refusing a dir that is not absolute, not clean (filepath.Clean
// changes it: "..", ".", "//" or a trailing slash) or not under root.
// root is absolute and clean (checkDataRoot).
func stateDirBeneath(root, dir string) (string, error) {
	if !filepath.IsAbs(dir) {
		return "", refused("state directory %q is not an absolute path", dir)
	}
	if filepath.Clean(dir) != dir {
		return "", refused("state directory %q is not a clean path", dir)
	}
	prefix := root + "/"
	if root == "/" {
		prefix = root
	}
	rel, ok := strings.CutPrefix(dir, prefix)
	if !ok || rel == "" {
		return "", refused("state directory %q is not under nerdctl's data root %s (--containerdNerdctlDataRoot)", dir, root)
	}
	return rel, nil
}

// dirOpener opens the directory rel (clean, relative, without "..")
// beneath the directory rootFD without following any symbolic link, and
// returns its descriptor.
type dirOpener func(rootFD int, rel string) (int, error)

// openBeneath opens rel with openat2's RESOLVE_BENEATH and
// RESOLVE_NO_SYMLINKS, or one component at a time where the kernel (older
// than 5.6) or a seccomp filter does not offer openat2.
func openBeneath(rootFD int, rel string) (int, error) {
	fd, err := openBeneath2(rootFD, rel)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		return openBeneathWalk(rootFD, rel)
	}
	return fd, err
}

// dirFlags open a directory without blocking on whatever else it may be.
const dirFlags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NONBLOCK | unix.O_CLOEXEC

func openBeneath2(rootFD int, rel string) (int, error) {
	for {
		fd, err := unix.Openat2(rootFD, rel, &unix.OpenHow{Flags: dirFlags,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS})
		if err == unix.EINTR || err == unix.EAGAIN { // EAGAIN: a rename raced the lookup
			continue
		}
		return fd, err
	}
}

// openBeneathWalk opens each component of rel in turn with O_NOFOLLOW, so
// that none of them may be a symbolic link.
func openBeneathWalk(rootFD int, rel string) (int, error) {
	fd, err := unix.Dup(rootFD)
	if err != nil {
		return -1, err
	}
	for _, name := range strings.Split(rel, "/") {
		if name == "" || name == "." || name == ".." {
			unix.Close(fd)
			return -1, unix.EXDEV
		}
		next, err := openatRetry(fd, name, dirFlags|unix.O_NOFOLLOW)
		if err == unix.ENOTDIR {
			// O_DIRECTORY meets a link before O_NOFOLLOW does.
			var st unix.Stat_t
			if unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
				err = unix.ELOOP
			}
		}
		unix.Close(fd)
		if err != nil {
			return -1, err
		}
		fd = next
	}
	return fd, nil
}

func openatRetry(dirFD int, name string, flags int) (int, error) {
	for {
		fd, err := unix.Openat(dirFD, name, flags, 0)
		if err != unix.EINTR {
			return fd, err
		}
	}
}

// readStateFile reads network-config.json in the state directory dir,
// which must be under root and reached without a symbolic link; the file
// must be a regular file (no link, FIFO or device) of at most maxPortData
// bytes. Nothing it opens can block: a FIFO is seen for what it is before
// it is read. A missing file is errNoNetworkConfig (the state directory
// of a nerdctl older than 2.2); every other failure is ErrRefused.
func readStateFile(root, dir string, open dirOpener) ([]byte, error) {
	rel, err := stateDirBeneath(root, dir)
	if err != nil {
		return nil, err
	}
	rootFD, err := openatRetry(unix.AT_FDCWD, root, dirFlags)
	if err != nil {
		return nil, refused("nerdctl's data root %s: %w", root, errnoErr(err))
	}
	defer unix.Close(rootFD)
	dirFD, err := open(rootFD, rel)
	if err != nil {
		return nil, refused("state directory %q: %w", dir, errnoErr(err))
	}
	defer unix.Close(dirFD)
	path := filepath.Join(dir, networkConfigFile)
	// Look before opening, so that a device node is never opened; the
	// descriptor is checked again, in case the name was replaced since.
	var st unix.Stat_t
	if err := unix.Fstatat(dirFD, networkConfigFile, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, errNoNetworkConfig
		}
		return nil, refused("%s: %w", path, errnoErr(err))
	}
	if err := regular(path, &st); err != nil {
		return nil, err
	}
	fd, err := openatRetry(dirFD, networkConfigFile, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC)
	if err != nil {
		return nil, refused("%s: %w", path, errnoErr(err))
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, refused("%s: %w", path, err)
	}
	if err := regular(path, &st); err != nil {
		return nil, err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxPortData+1))
	if err != nil {
		return nil, refused("%s: %w", path, err)
	}
	if len(data) > maxPortData {
		return nil, refused("%s is more than %d bytes", path, maxPortData)
	}
	return data, nil
}

// regular refuses anything but a regular file of at most maxPortData
// bytes.
func regular(path string, st *unix.Stat_t) error {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
	case unix.S_IFLNK:
		return refused("%s is a symbolic link", path)
	default:
		return refused("%s is not a regular file (mode %#o)", path, st.Mode&unix.S_IFMT)
	}
	if st.Size > maxPortData {
		return refused("%s is %d bytes, more than %d", path, st.Size, maxPortData)
	}
	return nil
}

// errnoErr says in words what the errors that refuse a path mean here.
func errnoErr(err error) error {
	switch {
	case errors.Is(err, unix.ELOOP):
		return fmt.Errorf("a symbolic link on the way (%w)", err)
	case errors.Is(err, unix.EXDEV):
		return fmt.Errorf("leads out of nerdctl's data root (%w)", err)
	case errors.Is(err, unix.ENOTDIR):
		return fmt.Errorf("not a directory on the way (%w)", err)
	}
	return err
}
