/*
 * ember-agent: the guest agent of Ember's default guest (docs/agent.md).
 *
 *   ember-agent [--port N]      listen on AF_VSOCK port N (default 52)
 *   ember-agent --unix PATH     listen on a Unix socket instead (host tests)
 *
 * Primer. The host reaches the agent through Firecracker's hybrid vsock (it
 * connects to the VM's Unix socket and sends "CONNECT 52\n"); on the guest
 * side that is an ordinary AF_VSOCK stream. Both directions carry frames:
 *
 *     u8 type | u32 length (big-endian) | length bytes of payload
 *
 * Requests: PING (the client's protocol version) -> PONG; EXEC (argv, env,
 * cwd, timeout, stdin) -> STDOUT/STDERR chunks, then EXIT; WRITE_FILE (path,
 * mode, data) -> OK; SET_TIME (unix ns) -> OK; READ_FILE (path) -> FILE_DATA
 * chunks, then OK; APPEND_FILE (path, data) -> OK. A request that cannot be
 * carried out gets ERROR and the connection stays open; a malformed frame
 * gets ERROR and the connection is closed. Every length is bounded before
 * anything is allocated.
 *
 * Shape. One process, one connection at a time, several requests per
 * connection. Commands are started with posix_spawn (glibc uses
 * clone(CLONE_VM|CLONE_VFORK): no page-table copy, which matters on hosts
 * where the guest kernel is emulated), each in its own session, so a
 * timeout kills its whole process group. A poll loop pumps stdin in and
 * stdout/stderr out; SIGCHLD arrives through a signalfd. The agent is a
 * child subreaper, so orphans of commands are reaped here, not left to /init.
 *
 * Built by guest/rootfs.py as a static binary (glibc's libc.a, no stdio),
 * installed as /bin/ember-agent and started by /etc/ember/init.d/50-agent.
 * It prints "ember-agent: listening on vsock port N" once it accepts
 * connections. Exit status: 1 when it cannot listen, 2 for a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h> /* rename() only: no stdio streams are used */
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#define PROG "ember-agent"
#define AGENT_VERSION "ember-agent 1.0"
#define PROTOCOL_VERSION 1
#define DEFAULT_PORT 52
#define LISTEN_BACKLOG 16

/* Frame types (docs/agent.md "Frames"). */
enum {
	T_PING = 0x01,
	T_EXEC = 0x02,
	T_WRITE_FILE = 0x03,
	T_SET_TIME = 0x04,
	T_READ_FILE = 0x05,
	T_APPEND_FILE = 0x06,
	T_PONG = 0x81,
	T_STDOUT = 0x82,
	T_STDERR = 0x83,
	T_EXIT = 0x84,
	T_OK = 0x85,
	T_ERROR = 0x86,
	T_FILE_DATA = 0x87,
};

/* Bounds (docs/agent.md "Limits"). */
#define HDR_LEN 5
#define MAX_PAYLOAD (8u << 20)
#define MAX_ARGS 4096        /* argv entries, and env entries */
#define MAX_STRING (128u << 10) /* one argv or env entry (Linux's MAX_ARG_STRLEN) */
#define MAX_PATH 4096
#define CHUNK (64u << 10)     /* output frames carry at most this much */
#define IO_TIMEOUT_MS 10000  /* a started frame must make progress this often */
#define FRESH_GRACE_MS 500   /* a new connection's first request may take this long before it yields */
#define SEND_TIMEOUT_S 30    /* a client that stops reading is dropped */
#define DRAIN_GRACE_MS 250   /* output read after the command exits, if its pipes stay open */

#define DEFAULT_PATH "/sbin:/bin:/usr/sbin:/usr/bin"

static int sigchld_fd = -1;
static pid_t running_pid; /* the command being run, 0 if none */
static int running_status;
static int running_reaped;
static uint8_t txbuf[HDR_LEN + CHUNK];
static uint8_t iobuf[CHUNK];

/* ---- small helpers (no stdio) ---- */

static int write_all(int fd, const void *data, size_t len)
{
	const char *p = data;
	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void put_str(int fd, const char *s)
{
	(void)write_all(fd, s, strlen(s));
}

static char *format_u32(uint32_t v, char out[11])
{
	char *p = out + 10;
	*p = '\0';
	do {
		*--p = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	return p;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint32_t get_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* ---- sending frames ---- */

static int send_all(int conn, const uint8_t *p, size_t len)
{
	while (len > 0) {
		/* SO_SNDTIMEO bounds each send: EAGAIN means the client stopped reading. */
		ssize_t n = send(conn, p, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* One frame of `type` whose payload is a then b (each may be empty); 0 or -1. */
static int send_frame2(int conn, uint8_t type, const void *a, size_t alen, const void *b, size_t blen)
{
	if (alen + blen > CHUNK)
		return -1; /* never happens: callers keep payloads small */
	txbuf[0] = type;
	put_be32(txbuf + 1, (uint32_t)(alen + blen));
	if (alen)
		memcpy(txbuf + HDR_LEN, a, alen);
	if (blen)
		memcpy(txbuf + HDR_LEN + alen, b, blen);
	return send_all(conn, txbuf, HDR_LEN + alen + blen);
}

static int send_frame(int conn, uint8_t type, const void *p, size_t len)
{
	return send_frame2(conn, type, p, len, NULL, 0);
}

/* ERROR "what: strerror(err)" (or just "what" when err is 0). */
static int send_error(int conn, const char *what, int err)
{
	const char *detail = err ? strerror(err) : "";
	size_t wl = strlen(what), dl = strlen(detail);
	if (wl > 1024)
		wl = 1024;
	if (dl > 256)
		dl = 256;
	if (!err)
		return send_frame(conn, T_ERROR, what, wl);
	uint8_t msg[1024 + 2 + 256];
	memcpy(msg, what, wl);
	memcpy(msg + wl, ": ", 2);
	memcpy(msg + wl + 2, detail, dl);
	return send_frame(conn, T_ERROR, msg, wl + 2 + dl);
}

/* ---- receiving ---- */

/* Reads exactly len bytes; each wait for more is bounded by IO_TIMEOUT_MS.
 * 0, or -1 on EOF, error or timeout. */
static int recv_exact(int conn, uint8_t *p, size_t len)
{
	while (len > 0) {
		struct pollfd pfd = { .fd = conn, .events = POLLIN };
		int r = poll(&pfd, 1, IO_TIMEOUT_MS);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		ssize_t n = recv(conn, p, len, MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* A bounds-checked reader over one payload. Any overrun sets bad. */
struct cursor {
	const uint8_t *p;
	size_t left;
	int bad;
};

static uint32_t get_u32(struct cursor *c)
{
	if (c->bad || c->left < 4) {
		c->bad = 1;
		return 0;
	}
	uint32_t v = get_be32(c->p);
	c->p += 4;
	c->left -= 4;
	return v;
}

/* A u32-length-prefixed byte string of at most max bytes; NULL when bad. */
static const uint8_t *get_bytes(struct cursor *c, uint32_t max, uint32_t *len)
{
	uint32_t n = get_u32(c);
	if (c->bad || n > max || n > c->left) {
		c->bad = 1;
		return NULL;
	}
	const uint8_t *p = c->p;
	c->p += n;
	c->left -= n;
	*len = n;
	return p;
}

/* A text string (no NUL inside) copied NUL-terminated into *arena. */
static char *get_string(struct cursor *c, uint32_t max, char **arena)
{
	uint32_t n;
	const uint8_t *p = get_bytes(c, max, &n);
	if (!p || memchr(p, 0, n)) {
		c->bad = 1;
		return NULL;
	}
	char *s = *arena;
	memcpy(s, p, n);
	s[n] = '\0';
	*arena += n + 1;
	return s;
}

/* ---- children ---- */

/* Reaps every exited child (orphans too: we are a subreaper). */
static void reap(void)
{
	struct signalfd_siginfo si;
	while (read(sigchld_fd, &si, sizeof(si)) > 0)
		;
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);
		if (pid <= 0)
			return;
		if (pid == running_pid) {
			running_status = status;
			running_reaped = 1;
		}
	}
}

static void kill_group(pid_t pid)
{
	/* The command leads its own session and process group. */
	kill(-pid, SIGKILL);
	kill(pid, SIGKILL);
}

/* Waits (blocking) until the running command is reaped. */
static void reap_running(void)
{
	while (!running_reaped) {
		int status;
		pid_t pid = waitpid(running_pid, &status, 0);
		if (pid == running_pid) {
			running_status = status;
			running_reaped = 1;
		} else if (pid < 0 && errno != EINTR) {
			running_status = 0;
			running_reaped = 1;
		}
	}
}

/* Starts argv[0] (searched in PATH when it has no '/'); 0 or an errno. */
static int spawn(char **argv, char **envp, const char *cwd, int fds[3], pid_t *pid)
{
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	sigset_t none, all;
	int err;
	posix_spawn_file_actions_init(&fa);
	posix_spawnattr_init(&attr);
	sigemptyset(&none);
	sigfillset(&all);
	/* dup2 clears FD_CLOEXEC on the new descriptor; every other fd of ours is CLOEXEC. */
	posix_spawn_file_actions_adddup2(&fa, fds[0], 0);
	posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
	posix_spawn_file_actions_adddup2(&fa, fds[2], 2);
	posix_spawn_file_actions_addchdir_np(&fa, cwd);
	posix_spawnattr_setsigmask(&attr, &none);
	posix_spawnattr_setsigdefault(&attr, &all); /* SIGPIPE is ignored here, not in the command */
	posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

	if (strchr(argv[0], '/')) {
		err = posix_spawn(pid, argv[0], &fa, &attr, argv, envp);
	} else {
		const char *path = DEFAULT_PATH;
		char full[MAX_PATH + 1];
		size_t nlen = strlen(argv[0]);
		int saw_eacces = 0;
		for (char **e = envp; *e; e++)
			if (strncmp(*e, "PATH=", 5) == 0)
				path = *e + 5;
		err = ENOENT;
		for (const char *dir = path;; dir++) {
			const char *end = strchrnul(dir, ':');
			size_t dlen = (size_t)(end - dir);
			if (dlen == 0) { /* an empty entry means the current directory */
				dir = ".";
				dlen = 1;
			}
			if (dlen + 1 + nlen <= MAX_PATH) {
				memcpy(full, dir, dlen);
				full[dlen] = '/';
				memcpy(full + dlen + 1, argv[0], nlen + 1);
				err = posix_spawn(pid, full, &fa, &attr, argv, envp);
				if (err == 0)
					break;
				if (err == EACCES)
					saw_eacces = 1;
				else if (err != ENOENT && err != ENOTDIR)
					break;
			}
			if (*end == '\0')
				break;
			dir = end;
		}
		if (err && (err == ENOENT || err == ENOTDIR) && saw_eacces)
			err = EACCES;
	}
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&attr);
	return err;
}

/* ---- requests ---- */

/* Sends EXIT; 0, or -1 when the connection is gone. */
static int send_exit(int conn, int32_t status, int timed_out)
{
	uint8_t p[5];
	put_be32(p, (uint32_t)status);
	p[4] = (uint8_t)(timed_out ? 1 : 0);
	return send_frame(conn, T_EXIT, p, sizeof(p));
}

/* A command that could not be started: a message on its stderr, then the
 * shell's statuses (127 not found, 126 anything else). */
static int send_spawn_failure(int conn, const char *what, const char *name, int err, int status)
{
	static const char prefix[] = PROG ": ";
	const char *detail = strerror(err);
	size_t wl = strlen(what), nl = strnlen(name, 512), dl = strlen(detail);
	uint8_t msg[64 + 512 + 256];
	size_t n = 0;
	memcpy(msg + n, prefix, sizeof(prefix) - 1);
	n += sizeof(prefix) - 1;
	memcpy(msg + n, what, wl);
	n += wl;
	msg[n++] = ' ';
	memcpy(msg + n, name, nl);
	n += nl;
	msg[n++] = ':';
	msg[n++] = ' ';
	if (dl > 200)
		dl = 200;
	memcpy(msg + n, detail, dl);
	n += dl;
	msg[n++] = '\n';
	if (send_frame(conn, T_STDERR, msg, n) < 0)
		return -1;
	return send_exit(conn, status, 0);
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* Runs the command and streams its output; 0, or -1 to close the connection. */
static int run_command(int conn, char **argv, char **envp, const char *cwd, uint32_t timeout_ms,
		       const uint8_t *in, size_t in_len)
{
	int pin[2], pout[2], perr[2];
	int child_fds[3];
	pid_t pid;
	int err;
	struct stat st;
	/* posix_spawn would report a bad cwd as if the program were missing. */
	if (stat(cwd, &st) < 0)
		return send_spawn_failure(conn, "cannot enter directory", cwd, errno, 126);
	if (!S_ISDIR(st.st_mode))
		return send_spawn_failure(conn, "cannot enter directory", cwd, ENOTDIR, 126);
	if (pipe2(pin, O_CLOEXEC) < 0)
		return send_spawn_failure(conn, "pipe for", argv[0], errno, 126);
	if (pipe2(pout, O_CLOEXEC) < 0) {
		err = errno;
		close(pin[0]);
		close(pin[1]);
		return send_spawn_failure(conn, "pipe for", argv[0], err, 126);
	}
	if (pipe2(perr, O_CLOEXEC) < 0) {
		err = errno;
		close(pin[0]);
		close(pin[1]);
		close(pout[0]);
		close(pout[1]);
		return send_spawn_failure(conn, "pipe for", argv[0], err, 126);
	}
	child_fds[0] = pin[0];
	child_fds[1] = pout[1];
	child_fds[2] = perr[1];
	reap(); /* forget orphans that exited since the last command */
	running_reaped = 0;
	err = spawn(argv, envp, cwd, child_fds, &pid);
	close(pin[0]);
	close(pout[1]);
	close(perr[1]);
	if (err) {
		close(pin[1]);
		close(pout[0]);
		close(perr[0]);
		return send_spawn_failure(conn, "cannot run", argv[0], err, err == ENOENT ? 127 : 126);
	}
	running_pid = pid;

	int in_fd = pin[1], out_fd = pout[0], err_fd = perr[0];
	size_t in_off = 0;
	int timed_out = 0, hung_up = 0;
	int64_t deadline = timeout_ms ? now_ms() + timeout_ms : -1;
	int64_t drain_deadline = -1;
	fcntl(in_fd, F_SETFL, O_NONBLOCK);
	fcntl(out_fd, F_SETFL, O_NONBLOCK);
	fcntl(err_fd, F_SETFL, O_NONBLOCK);
	if (in_len == 0)
		close_fd(&in_fd);

	for (;;) {
		if (running_reaped && out_fd < 0 && err_fd < 0)
			break;
		int64_t now = now_ms();
		if (!running_reaped && deadline >= 0 && now >= deadline && !timed_out) {
			timed_out = 1;
			kill_group(pid);
		}
		if (running_reaped && drain_deadline < 0) {
			drain_deadline = now + DRAIN_GRACE_MS;
			close_fd(&in_fd);
		}
		if (drain_deadline >= 0 && now >= drain_deadline)
			break; /* something outside the command's group holds its pipes */

		struct pollfd p[5];
		int np = 0, i_conn, i_sig, i_in = -1, i_out = -1, i_err = -1;
		p[np] = (struct pollfd){ .fd = conn, .events = 0 }; /* POLLHUP/POLLERR only */
		i_conn = np++;
		p[np] = (struct pollfd){ .fd = sigchld_fd, .events = POLLIN };
		i_sig = np++;
		if (in_fd >= 0) {
			p[np] = (struct pollfd){ .fd = in_fd, .events = POLLOUT };
			i_in = np++;
		}
		if (out_fd >= 0) {
			p[np] = (struct pollfd){ .fd = out_fd, .events = POLLIN };
			i_out = np++;
		}
		if (err_fd >= 0) {
			p[np] = (struct pollfd){ .fd = err_fd, .events = POLLIN };
			i_err = np++;
		}
		int64_t wait = -1;
		if (!running_reaped && deadline >= 0 && !timed_out)
			wait = deadline - now;
		if (drain_deadline >= 0)
			wait = drain_deadline - now;
		if (wait > 1000000)
			wait = 1000000;
		if (poll(p, (nfds_t)np, (int)wait) < 0) {
			if (errno == EINTR)
				continue;
			hung_up = 1; /* cannot happen with valid fds; end cleanly */
			break;
		}
		if (p[i_conn].revents & (POLLHUP | POLLERR | POLLNVAL)) {
			hung_up = 1;
			break;
		}
		if (p[i_sig].revents)
			reap();
		if (i_in >= 0 && p[i_in].revents) {
			ssize_t n = write(in_fd, in + in_off, in_len - in_off);
			if (n > 0)
				in_off += (size_t)n;
			if ((n < 0 && errno != EAGAIN && errno != EINTR) || in_off == in_len)
				close_fd(&in_fd); /* EPIPE: the command does not want the rest */
		}
		int fdi[2] = { i_out, i_err };
		int *fdp[2] = { &out_fd, &err_fd };
		uint8_t types[2] = { T_STDOUT, T_STDERR };
		for (int k = 0; k < 2; k++) {
			if (fdi[k] < 0 || !p[fdi[k]].revents)
				continue;
			ssize_t n = read(*fdp[k], iobuf, sizeof(iobuf));
			if (n > 0) {
				if (send_frame(conn, types[k], iobuf, (size_t)n) < 0) {
					hung_up = 1;
					break;
				}
			} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
				close_fd(fdp[k]);
			}
		}
		if (hung_up)
			break;
	}
	close_fd(&in_fd);
	close_fd(&out_fd);
	close_fd(&err_fd);
	if (hung_up && !running_reaped)
		kill_group(pid);
	reap_running();
	running_pid = 0;
	if (hung_up)
		return -1;
	int32_t status = WIFEXITED(running_status) ? WEXITSTATUS(running_status)
		       : WIFSIGNALED(running_status) ? -WTERMSIG(running_status) : 0;
	return send_exit(conn, status, timed_out);
}

static int is_default_overridden(char **env, size_t envc, const char *def)
{
	size_t nl = (size_t)(strchr(def, '=') - def) + 1;
	for (size_t i = 0; i < envc; i++)
		if (strncmp(env[i], def, nl) == 0)
			return 1;
	return 0;
}

/* EXEC: u32 argc, argc strings, u32 envc, envc strings, cwd string, u32 timeout_ms, stdin bytes. */
static int handle_exec(int conn, const uint8_t *payload, uint32_t len)
{
	static const char *const defaults[] = { "PATH=" DEFAULT_PATH, "HOME=/root" };
	enum { NDEFAULTS = sizeof(defaults) / sizeof(defaults[0]) };
	struct cursor c = { payload, len, 0 };
	uint32_t argc = get_u32(&c);
	if (c.bad || argc == 0 || argc > MAX_ARGS)
		return send_error(conn, "malformed EXEC: argc out of range", 0), -1;
	/* The strings, NUL-terminated, fit in the payload plus one byte each. */
	char *arena = malloc((size_t)len + 2 * MAX_ARGS + MAX_PATH + 2);
	char **argv = malloc(sizeof(char *) * (argc + 1));
	char **envp = NULL;
	int rc = -1;
	if (!arena || !argv) {
		send_error(conn, "EXEC: out of memory", 0);
		goto out;
	}
	char *a = arena;
	for (uint32_t i = 0; i < argc; i++)
		argv[i] = get_string(&c, MAX_STRING, &a);
	argv[argc] = NULL;
	uint32_t envc = get_u32(&c);
	if (c.bad || envc > MAX_ARGS) {
		send_error(conn, "malformed EXEC: bad argv or envc", 0);
		goto out;
	}
	envp = malloc(sizeof(char *) * (envc + NDEFAULTS + 1));
	if (!envp) {
		send_error(conn, "EXEC: out of memory", 0);
		goto out;
	}
	for (uint32_t i = 0; i < envc; i++) {
		envp[i] = get_string(&c, MAX_STRING, &a);
		if (envp[i] && (envp[i][0] == '=' || !strchr(envp[i], '=')))
			c.bad = 1;
	}
	char *cwd = get_string(&c, MAX_PATH, &a);
	uint32_t timeout_ms = get_u32(&c);
	uint32_t in_len = 0;
	const uint8_t *in = get_bytes(&c, MAX_PAYLOAD, &in_len);
	if (c.bad || c.left != 0 || argv[0][0] == '\0') {
		send_error(conn, "malformed EXEC: bad env, cwd, timeout or stdin, or trailing bytes", 0);
		goto out;
	}
	size_t n = envc;
	for (size_t i = 0; i < NDEFAULTS; i++)
		if (!is_default_overridden(envp, envc, defaults[i]))
			envp[n++] = (char *)defaults[i];
	envp[n] = NULL;
	rc = run_command(conn, argv, envp, cwd[0] ? cwd : "/", timeout_ms, in, in_len);
out:
	free(envp);
	free(argv);
	free(arena);
	return rc;
}

/* WRITE_FILE: path string, u32 mode, data bytes. Written beside, then renamed. */
static int handle_write_file(int conn, const uint8_t *payload, uint32_t len)
{
	static const char suffix[] = ".ember-agent-tmp";
	char path[MAX_PATH + 1], tmp[MAX_PATH + sizeof(suffix)];
	char *a = path;
	struct cursor c = { payload, len, 0 };
	char *p = get_string(&c, MAX_PATH, &a);
	uint32_t mode = get_u32(&c);
	uint32_t dlen = 0;
	const uint8_t *data = get_bytes(&c, MAX_PAYLOAD, &dlen);
	if (c.bad || c.left != 0 || p[0] != '/' || mode > 07777)
		return send_error(conn, "malformed WRITE_FILE: needs an absolute path, a mode <= 07777 and data", 0),
		       -1;
	size_t pl = strlen(p);
	memcpy(tmp, p, pl);
	memcpy(tmp + pl, suffix, sizeof(suffix));
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		return send_error(conn, p, errno);
	if (write_all(fd, data, dlen) < 0 || fchmod(fd, (mode_t)mode) < 0) {
		int err = errno;
		close(fd);
		unlink(tmp);
		return send_error(conn, p, err);
	}
	if (close(fd) < 0 || rename(tmp, p) < 0) {
		int err = errno;
		unlink(tmp);
		return send_error(conn, p, err);
	}
	return send_frame(conn, T_OK, NULL, 0);
}

/* 0 if fd is a regular file, else the errno to report (EISDIR, EINVAL, fstat's). */
static int not_regular(int fd)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		return errno;
	if (S_ISREG(st.st_mode))
		return 0;
	return S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
}

/* Opens path (flags plus O_CLOEXEC, O_NOCTTY and O_NONBLOCK) as a regular file.
 * The fd; or -1 once the error has been sent to the client, *rc being what
 * send_error returned (the handler's own return value). */
static int open_regular(int conn, const char *path, int flags, int *rc)
{
	int fd = open(path, flags | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	int err = fd < 0 ? errno : not_regular(fd);
	if (err) {
		if (fd >= 0)
			close(fd);
		*rc = send_error(conn, path, err);
		return -1;
	}
	return fd;
}

/* READ_FILE: path string. The file's bytes as FILE_DATA frames of at most
 * CHUNK bytes, then OK. Only a regular file is read (O_NONBLOCK so that a
 * FIFO cannot block the open; the S_ISREG check then refuses it), so the
 * agent never waits on a device or pipe the guest user names. An error
 * before the first chunk or in the middle is sent as ERROR and the
 * connection stays open: the host discards what it got. */
static int handle_read_file(int conn, const uint8_t *payload, uint32_t len)
{
	char path[MAX_PATH + 1];
	char *a = path;
	struct cursor c = { payload, len, 0 };
	char *p = get_string(&c, MAX_PATH, &a);
	if (c.bad || c.left != 0 || p[0] != '/')
		return send_error(conn, "malformed READ_FILE: needs an absolute path", 0), -1;
	int rc, err;
	int fd = open_regular(conn, p, O_RDONLY, &rc);
	if (fd < 0)
		return rc;
	for (;;) {
		ssize_t n = read(fd, iobuf, CHUNK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			err = errno;
			close(fd);
			return send_error(conn, p, err);
		}
		if (n == 0)
			break;
		if (send_frame(conn, T_FILE_DATA, iobuf, (size_t)n) < 0) {
			close(fd);
			return -1;
		}
	}
	close(fd);
	return send_frame(conn, T_OK, NULL, 0);
}

/* APPEND_FILE: path string, data bytes. Appended to an existing regular file
 * (O_APPEND, O_NOFOLLOW); the host's way to write a file longer than one
 * frame after a WRITE_FILE of its first part. */
static int handle_append_file(int conn, const uint8_t *payload, uint32_t len)
{
	char path[MAX_PATH + 1];
	char *a = path;
	struct cursor c = { payload, len, 0 };
	char *p = get_string(&c, MAX_PATH, &a);
	uint32_t dlen = 0;
	const uint8_t *data = get_bytes(&c, MAX_PAYLOAD, &dlen);
	if (c.bad || c.left != 0 || p[0] != '/')
		return send_error(conn, "malformed APPEND_FILE: needs an absolute path and data", 0), -1;
	int rc;
	int fd = open_regular(conn, p, O_WRONLY | O_APPEND | O_NOFOLLOW, &rc);
	if (fd < 0)
		return rc;
	if (write_all(fd, data, dlen) < 0) {
		int err = errno;
		close(fd);
		return send_error(conn, p, err);
	}
	if (close(fd) < 0)
		return send_error(conn, p, errno);
	return send_frame(conn, T_OK, NULL, 0);
}

/* SET_TIME: u64 nanoseconds since the Unix epoch (CLOCK_REALTIME). */
static int handle_set_time(int conn, const uint8_t *payload, uint32_t len)
{
	if (len != 8)
		return send_error(conn, "malformed SET_TIME: payload must be 8 bytes", 0), -1;
	uint64_t ns = (uint64_t)get_be32(payload) << 32 | get_be32(payload + 4);
	if (ns > (uint64_t)INT64_MAX)
		return send_error(conn, "malformed SET_TIME: time out of range", 0), -1;
	struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u) };
	if (clock_settime(CLOCK_REALTIME, &ts) < 0)
		return send_error(conn, "clock_settime", errno);
	return send_frame(conn, T_OK, NULL, 0);
}

static int handle_ping(int conn, const uint8_t *payload, uint32_t len)
{
	static const uint8_t version = PROTOCOL_VERSION;
	if (len != 1 || payload[0] != PROTOCOL_VERSION)
		return send_error(conn, "unsupported protocol version (the agent speaks version 1)", 0), -1;
	return send_frame2(conn, T_PONG, &version, 1, AGENT_VERSION, sizeof(AGENT_VERSION) - 1);
}

/* ---- connections ---- */

/* Waits for the next request's first byte. 1: readable; 0: the connection
 * should end (EOF, error, a fresh connection silent for IO_TIMEOUT_MS, or an
 * idle one while another client waits). A connection idle between requests
 * yields at once; a fresh one only after FRESH_GRACE_MS of silence, so that a
 * client which has just connected is not cut off before its first request. */
static int wait_for_request(int conn, int srv, int served)
{
	int64_t start = now_ms();
	for (;;) {
		int64_t idle = now_ms() - start;
		int may_yield = served || idle >= FRESH_GRACE_MS;
		int64_t wait = -1;
		if (!served) {
			if (idle >= IO_TIMEOUT_MS)
				return 0;
			wait = may_yield ? IO_TIMEOUT_MS - idle : FRESH_GRACE_MS - idle;
		}
		struct pollfd p[3] = {
			{ .fd = conn, .events = POLLIN },
			{ .fd = may_yield ? srv : -1, .events = POLLIN }, /* fd -1: ignored by poll */
			{ .fd = sigchld_fd, .events = POLLIN },
		};
		int r = poll(p, 3, (int)wait);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return 0;
		if (p[2].revents)
			reap();
		if (p[0].revents)
			return 1;
		if (p[1].revents)
			return 0; /* yield to the waiting client */
	}
}

/* The request types and their handlers; any other type is refused. A handler
 * returns < 0 when the connection must end. */
static int (*const handlers[])(int conn, const uint8_t *payload, uint32_t len) = {
	[T_PING] = handle_ping,
	[T_EXEC] = handle_exec,
	[T_WRITE_FILE] = handle_write_file,
	[T_SET_TIME] = handle_set_time,
	[T_READ_FILE] = handle_read_file,
	[T_APPEND_FILE] = handle_append_file,
};

static void serve(int conn, int srv)
{
	struct timeval tv = { .tv_sec = SEND_TIMEOUT_S };
	setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	for (int served = 0;; served = 1) {
		uint8_t hdr[HDR_LEN];
		if (!wait_for_request(conn, srv, served) || recv_exact(conn, hdr, HDR_LEN) < 0)
			return;
		uint8_t type = hdr[0];
		uint32_t len = get_be32(hdr + 1);
		if (type >= sizeof(handlers) / sizeof(handlers[0]) || handlers[type] == NULL) {
			send_error(conn, "malformed frame: unknown request type", 0);
			return;
		}
		if (len > MAX_PAYLOAD) {
			send_error(conn, "malformed frame: payload longer than 8 MiB", 0);
			return;
		}
		uint8_t *payload = malloc(len ? len : 1);
		if (!payload) {
			send_error(conn, "out of memory for the request", 0);
			return;
		}
		int rc = -1;
		if (recv_exact(conn, payload, len) == 0)
			rc = handlers[type](conn, payload, len);
		free(payload);
		if (rc < 0)
			return;
	}
}

static int listen_vsock(uint32_t port)
{
	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof(addr));
	addr.svm_family = AF_VSOCK;
	addr.svm_cid = VMADDR_CID_ANY;
	addr.svm_port = port;
	int srv = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(srv, LISTEN_BACKLOG) < 0)
		return -1;
	return srv;
}

static int listen_unix(const char *path)
{
	struct sockaddr_un addr;
	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(addr.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(addr.sun_path, path);
	unlink(path);
	int srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(srv, LISTEN_BACKLOG) < 0)
		return -1;
	return srv;
}

static __attribute__((noreturn)) void usage(void)
{
	put_str(2, "usage: " PROG " [--port N] [--unix PATH]\n");
	exit(2);
}

static uint32_t parse_port(const char *s)
{
	char *end;
	unsigned long long v;
	if (*s < '0' || *s > '9')
		usage();
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || v > UINT32_MAX)
		usage();
	return (uint32_t)v;
}

int main(int argc, char **argv)
{
	uint32_t port = DEFAULT_PORT;
	const char *unix_path = NULL;
	char digits[11];
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
			port = parse_port(argv[++i]);
		else if (strcmp(argv[i], "--unix") == 0 && i + 1 < argc)
			unix_path = argv[++i];
		else
			usage();
	}
	signal(SIGPIPE, SIG_IGN);
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	sigchld_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sigchld_fd < 0) {
		put_str(2, PROG ": signalfd: ");
		put_str(2, strerror(errno));
		put_str(2, "\n");
		return 1;
	}
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	if (chdir("/") < 0)
		return 1;

	int srv = unix_path ? listen_unix(unix_path) : listen_vsock(port);
	if (srv < 0) {
		put_str(2, PROG ": cannot listen on ");
		put_str(2, unix_path ? unix_path : "vsock port ");
		if (!unix_path)
			put_str(2, format_u32(port, digits));
		put_str(2, ": ");
		put_str(2, strerror(errno));
		put_str(2, "\n");
		return 1;
	}
	/* Readiness, for whoever waits on the console. */
	if (unix_path) {
		put_str(1, PROG ": listening on unix socket ");
		put_str(1, unix_path);
	} else {
		put_str(1, PROG ": listening on vsock port ");
		put_str(1, format_u32(port, digits));
	}
	put_str(1, "\n");
	for (;;) {
		int conn = accept4(srv, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				struct timespec pause = { .tv_nsec = 100000000 }; /* let resources come back */
				nanosleep(&pause, NULL);
				continue;
			}
			put_str(2, PROG ": accept: ");
			put_str(2, strerror(errno));
			put_str(2, "\n");
			return 1;
		}
		serve(conn, srv);
		close(conn);
	}
}
