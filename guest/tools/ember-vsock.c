/*
 * ember-vsock: a tiny AF_VSOCK client and echo server for Ember's guest.
 *
 *   ember-vsock listen PORT [--once]   echo every connection back until EOF
 *                                      (prints "listening on vsock port PORT"
 *                                      on stdout once it accepts connections)
 *   ember-vsock connect CID PORT       stdin -> socket, socket -> stdout
 *   ember-vsock cid                    print this machine's local CID
 *
 * Primer. AF_VSOCK (linux/vm_sockets.h) addresses a socket by a 32-bit
 * context ID (CID) and a 32-bit port: CID 2 is the host, a guest has its own
 * CID (>= 3) set by the VMM; VMADDR_CID_ANY binds to the local one. Streams
 * behave like TCP: shutdown(SHUT_WR) sends end-of-file to the peer while the
 * other direction stays open, which is how `connect` hands its whole stdin
 * to an echo server and still reads every byte of the answer.
 *
 * Built by guest/rootfs.py as a static binary (glibc's libc.a, no stdio) and
 * installed as /bin/ember-vsock in the initramfs and the ext4 root. Exit
 * status: 0 on success, 1 with a one-line message on stderr when something
 * fails (refused, reset, timed out, ...), 2 for a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#define PROG "ember-vsock"
#define BUF_SIZE (64 * 1024)
#define LISTEN_BACKLOG 16
#define EXIT_FAIL 1
#define EXIT_USAGE 2

static const char usage_text[] =
	"usage: " PROG " listen PORT [--once]   echo each connection back until EOF\n"
	"       " PROG " connect CID PORT       stream stdin to CID:PORT, the replies to stdout\n"
	"       " PROG " cid                    print the local CID\n";

static char buf[BUF_SIZE];

/* write(2) all of it; EINTR is retried, EAGAIN waits for the fd. */
static int write_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				struct pollfd p = { .fd = fd, .events = POLLOUT };
				if (poll(&p, 1, -1) < 0 && errno != EINTR)
					return -1;
				continue;
			}
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

static void put_str(int fd, const char *s)
{
	(void)write_all(fd, s, strlen(s));
}

/* Decimal digits of v, into the end of out[11]; returns the first digit. */
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

/* "ember-vsock: WHAT: strerror(err)" on stderr. */
static void report(const char *what, int err)
{
	put_str(2, PROG ": ");
	put_str(2, what);
	put_str(2, ": ");
	put_str(2, strerror(err));
	put_str(2, "\n");
}

/* The same with the address: "WHAT CID:PORT", or "WHAT port PORT" for CID_ANY. */
static void report_addr(const char *what, uint32_t cid, uint32_t port, int err)
{
	char digits[11];
	put_str(2, PROG ": ");
	put_str(2, what);
	if (cid == VMADDR_CID_ANY) {
		put_str(2, " port ");
	} else {
		put_str(2, " ");
		put_str(2, format_u32(cid, digits));
		put_str(2, ":");
	}
	put_str(2, format_u32(port, digits));
	put_str(2, ": ");
	put_str(2, strerror(err));
	put_str(2, "\n");
}

static __attribute__((noreturn)) void die(const char *what)
{
	report(what, errno);
	exit(EXIT_FAIL);
}

static __attribute__((noreturn)) void usage(void)
{
	put_str(2, usage_text);
	exit(EXIT_USAGE);
}

/* A CID or port: decimal, 0 .. 2^32-1. */
static uint32_t parse_u32(const char *s)
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

static struct sockaddr_vm vsock_addr(uint32_t cid, uint32_t port)
{
	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof(addr));
	addr.svm_family = AF_VSOCK;
	addr.svm_cid = cid;
	addr.svm_port = port;
	return addr;
}

/* Echo one connection until the peer's EOF; 0, or an errno. */
static int echo(int conn)
{
	for (;;) {
		ssize_t n = recv(conn, buf, sizeof(buf), 0);
		if (n == 0)
			break;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		for (ssize_t off = 0; off < n;) {
			ssize_t w = send(conn, buf + off, (size_t)(n - off), MSG_NOSIGNAL);
			if (w < 0) {
				if (errno == EINTR)
					continue;
				return errno;
			}
			off += w;
		}
	}
	shutdown(conn, SHUT_WR);
	return 0;
}

static int cmd_listen(uint32_t port, int once)
{
	struct sockaddr_vm addr = vsock_addr(VMADDR_CID_ANY, port);
	char digits[11];
	int srv = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (srv < 0)
		die("socket(AF_VSOCK)");
	if (bind(srv, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		report_addr("bind to", VMADDR_CID_ANY, port, errno);
		return EXIT_FAIL;
	}
	if (listen(srv, LISTEN_BACKLOG) < 0)
		die("listen");
	/* Readiness, for whoever starts us in the background. */
	signal(SIGPIPE, SIG_IGN);
	put_str(1, "listening on vsock port ");
	put_str(1, format_u32(port, digits));
	put_str(1, "\n");
	if (!once)
		signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
	for (;;) {
		int err;
		int conn = accept4(srv, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept");
		}
		if (once) {
			err = echo(conn);
			if (err)
				report("echo", err);
			close(conn);
			return err ? EXIT_FAIL : 0;
		}
		/* One process per connection: a silent peer blocks nobody else. */
		switch (fork()) {
		case -1:
			report("fork", errno);
			break;
		case 0:
			close(srv);
			err = echo(conn);
			if (err)
				report("echo", err);
			_exit(err ? EXIT_FAIL : 0);
		}
		close(conn);
	}
}

static int cmd_connect(uint32_t cid, uint32_t port)
{
	struct sockaddr_vm addr = vsock_addr(cid, port);
	/* Bytes read from stdin and not yet sent: buf[pending_off, pending_end). */
	size_t pending_off = 0, pending_end = 0;
	int stdin_open = 1;
	static char rbuf[BUF_SIZE];
	int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		die("socket(AF_VSOCK)");
	if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		report_addr("connect to", cid, port, errno);
		return EXIT_FAIL;
	}
	/* Non-blocking sends: a full send queue must never stop us reading. */
	if (fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK) < 0)
		die("fcntl");
	for (;;) {
		struct pollfd fds[2];
		nfds_t nfds = 1;
		fds[0].fd = s;
		fds[0].events = POLLIN | (pending_end > pending_off ? POLLOUT : 0);
		fds[0].revents = 0;
		if (stdin_open && pending_end == pending_off) {
			fds[1].fd = 0;
			fds[1].events = POLLIN;
			fds[1].revents = 0;
			nfds = 2;
		}
		if (poll(fds, nfds, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t n = recv(s, rbuf, sizeof(rbuf), 0);
			if (n == 0)
				return 0; /* the peer is done */
			if (n < 0 && errno != EINTR && errno != EAGAIN) {
				report_addr("receive from", cid, port, errno);
				return EXIT_FAIL;
			}
			if (n > 0 && write_all(1, rbuf, (size_t)n) < 0)
				die("write to stdout");
		}
		if (pending_end > pending_off && (fds[0].revents & POLLOUT)) {
			ssize_t n = send(s, buf + pending_off, pending_end - pending_off, MSG_NOSIGNAL);
			if (n < 0 && errno != EINTR && errno != EAGAIN) {
				report_addr("send to", cid, port, errno);
				return EXIT_FAIL;
			}
			if (n > 0)
				pending_off += (size_t)n;
			if (pending_off == pending_end)
				pending_off = pending_end = 0;
		}
		if (nfds == 2 && fds[1].revents) {
			ssize_t n;
			if (fds[1].revents & POLLNVAL) {
				errno = EBADF;
				die("read stdin");
			}
			n = read(0, buf, sizeof(buf));
			if (n < 0 && errno != EINTR && errno != EAGAIN)
				die("read stdin");
			if (n == 0) {
				stdin_open = 0;
				if (shutdown(s, SHUT_WR) < 0) {
					report_addr("shutdown", cid, port, errno);
					return EXIT_FAIL;
				}
			}
			if (n > 0)
				pending_end = (size_t)n;
		}
	}
}

static int cmd_cid(void)
{
	unsigned int cid = 0;
	char digits[11];
	char *text;
	int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open /dev/vsock");
	if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
		die("IOCTL_VM_SOCKETS_GET_LOCAL_CID");
	close(fd);
	if (cid == VMADDR_CID_ANY) {
		/* What the kernel answers when no transport (device) is loaded. */
		put_str(2, PROG ": no vsock transport: the local CID is VMADDR_CID_ANY\n");
		return EXIT_FAIL;
	}
	text = format_u32(cid, digits);
	if (write_all(1, text, strlen(text)) < 0 || write_all(1, "\n", 1) < 0)
		die("write to stdout");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "listen") == 0) {
		if (argc == 3)
			return cmd_listen(parse_u32(argv[2]), 0);
		if (argc == 4 && strcmp(argv[3], "--once") == 0)
			return cmd_listen(parse_u32(argv[2]), 1);
	} else if (argc == 4 && strcmp(argv[1], "connect") == 0) {
		return cmd_connect(parse_u32(argv[2]), parse_u32(argv[3]));
	} else if (argc == 2 && strcmp(argv[1], "cid") == 0) {
		return cmd_cid();
	}
	usage();
}
