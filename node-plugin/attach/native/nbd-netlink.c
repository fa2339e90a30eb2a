/*
 * arbor-nbd-netlink: configures the kernel's NBD driver through its generic netlink
 * family ("nbd"), the interface nbd-client uses, with what nbd-client 3.24 cannot
 * send: a request timeout of 0, a dead-connection timeout, a backend identifier, and
 * RECONFIGURE (fresh sockets for a live device, a new size).
 *
 * Node.js has no netlink socket, so the node plugin runs this helper once per
 * operation. The plugin negotiates each NBD connection itself (the kernel never
 * handshakes) and passes the connected sockets as inherited file descriptors; the
 * kernel takes its own reference to each socket, so they outlive this process.
 *
 *   arbor-nbd-netlink connect --size BYTES --block-size BYTES --server-flags N
 *                     [--timeout S] [--dead-conn-timeout S] [--identifier ID] [--index N] --fd FD...
 *   arbor-nbd-netlink reconfigure --index N [--identifier ID] [--size BYTES]
 *                     [--timeout S] [--dead-conn-timeout S] [--fd FD...]
 *   arbor-nbd-netlink disconnect --index N
 *   arbor-nbd-netlink status [--index N]
 *
 * Prints one JSON object on stdout: {"ok":true,...} or {"ok":false,"errno":N,
 * "code":"ENAME","message":"..."}. Exit status 0 on success, 1 when the kernel (or the
 * netlink socket) refused, 2 when the command line is wrong.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_FDS 64
/* A request holds at most MAX_FDS nested socket items and a short identifier. */
#define BUFFER_BYTES 8192
/* An identifier longer than this is surely a mistake (the kernel stores it as given). */
#define MAX_IDENTIFIER_BYTES 256

struct options {
	const char *command;
	int have_index;
	uint32_t index;
	int have_size;
	uint64_t size;
	int have_block_size;
	uint64_t block_size;
	int have_server_flags;
	uint64_t server_flags;
	int have_timeout;
	uint64_t timeout;
	int have_dead_conn_timeout;
	uint64_t dead_conn_timeout;
	const char *identifier;
	int fds[MAX_FDS];
	int fd_count;
};

/* ---- output ---- */

static void json_string(FILE *out, const char *text)
{
	fputc('"', out);
	for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
		if (*p == '"' || *p == '\\')
			fprintf(out, "\\%c", *p);
		else if (*p < 0x20)
			fprintf(out, "\\u%04x", *p);
		else
			fputc(*p, out);
	}
	fputc('"', out);
}

static const char *errno_name(int err)
{
	switch (err) {
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case EIO: return "EIO";
	case EBADF: return "EBADF";
	case ENOMEM: return "ENOMEM";
	case EACCES: return "EACCES";
	case EBUSY: return "EBUSY";
	case EEXIST: return "EEXIST";
	case ENODEV: return "ENODEV";
	case EINVAL: return "EINVAL";
	case ENOSPC: return "ENOSPC";
	case ERANGE: return "ERANGE";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case ENOTSOCK: return "ENOTSOCK";
	case EPROTONOSUPPORT: return "EPROTONOSUPPORT";
	case EAFNOSUPPORT: return "EAFNOSUPPORT";
	case ETIMEDOUT: return "ETIMEDOUT";
	default: return "EUNKNOWN";
	}
}

/* Prints the failure object and exits 1. */
static void refuse(int err, const char *message)
{
	printf("{\"ok\":false,\"errno\":%d,\"code\":\"%s\",\"message\":", err, errno_name(err));
	json_string(stdout, message);
	printf("}\n");
	exit(1);
}

/* Reports a failure, with the error's text and the kernel's extended ack message (`detail`) when it sent one. */
static void fail(int err, const char *detail, const char *format, ...)
{
	char message[1024];
	va_list args;
	va_start(args, format);
	vsnprintf(message, sizeof message, format, args);
	va_end(args);
	char full[1400];
	if (detail && *detail)
		snprintf(full, sizeof full, "%s: %s (%s)", message, strerror(err), detail);
	else
		snprintf(full, sizeof full, "%s: %s", message, strerror(err));
	refuse(err, full);
}

static void usage(const char *format, ...)
{
	va_list args;
	va_start(args, format);
	fprintf(stderr, "arbor-nbd-netlink: ");
	vfprintf(stderr, format, args);
	va_end(args);
	fprintf(stderr,
		"\nusage: arbor-nbd-netlink connect --size BYTES --block-size BYTES --server-flags N [--timeout S]\n"
		"                         [--dead-conn-timeout S] [--identifier ID] [--index N] --fd FD...\n"
		"       arbor-nbd-netlink reconfigure --index N [--identifier ID] [--size BYTES] [--timeout S]\n"
		"                         [--dead-conn-timeout S] [--fd FD...]\n"
		"       arbor-nbd-netlink disconnect --index N\n"
		"       arbor-nbd-netlink status [--index N]\n");
	exit(2);
}

/* ---- command line ---- */

static uint64_t parse_number(const char *option, const char *text, uint64_t max)
{
	if (!text || !*text || text[0] == '-' || text[0] == '+')
		usage("%s needs a whole number, not '%s'", option, text ? text : "");
	errno = 0;
	char *end;
	unsigned long long value = strtoull(text, &end, 0);
	if (errno || *end || value > max)
		usage("%s: '%s' is not a whole number up to %" PRIu64, option, text, max);
	return value;
}

static void parse_options(int argc, char **argv, struct options *o)
{
	memset(o, 0, sizeof *o);
	if (argc < 2)
		usage("no command");
	o->command = argv[1];
	for (int i = 2; i < argc; i++) {
		const char *option = argv[i];
		const char *value = i + 1 < argc ? argv[i + 1] : NULL;
		if (!value)
			usage("%s needs a value", option);
		i++;
		if (!strcmp(option, "--index")) {
			o->have_index = 1;
			o->index = (uint32_t)parse_number(option, value, INT32_MAX);
		} else if (!strcmp(option, "--size")) {
			o->have_size = 1;
			o->size = parse_number(option, value, INT64_MAX);
		} else if (!strcmp(option, "--block-size")) {
			o->have_block_size = 1;
			o->block_size = parse_number(option, value, 1 << 30);
		} else if (!strcmp(option, "--server-flags")) {
			o->have_server_flags = 1;
			o->server_flags = parse_number(option, value, UINT16_MAX);
		} else if (!strcmp(option, "--timeout")) {
			o->have_timeout = 1;
			o->timeout = parse_number(option, value, UINT32_MAX);
		} else if (!strcmp(option, "--dead-conn-timeout")) {
			o->have_dead_conn_timeout = 1;
			o->dead_conn_timeout = parse_number(option, value, UINT32_MAX);
		} else if (!strcmp(option, "--identifier")) {
			if (!*value || strlen(value) > MAX_IDENTIFIER_BYTES)
				usage("--identifier must be 1 to %d bytes", MAX_IDENTIFIER_BYTES);
			o->identifier = value;
		} else if (!strcmp(option, "--fd")) {
			if (o->fd_count == MAX_FDS)
				usage("at most %d --fd", MAX_FDS);
			int fd = (int)parse_number(option, value, INT_MAX);
			struct stat st;
			if (fstat(fd, &st) < 0)
				usage("--fd %d is not open in this process", fd);
			if (!S_ISSOCK(st.st_mode))
				usage("--fd %d is not a socket", fd);
			o->fds[o->fd_count++] = fd;
		} else {
			usage("unknown option %s", option);
		}
	}
}

/* ---- netlink messages ---- */

struct message {
	char buffer[BUFFER_BYTES] __attribute__((aligned(NLMSG_ALIGNTO)));
	struct nlmsghdr *header;
};

static void message_start(struct message *m, uint16_t type, uint8_t command, uint8_t version)
{
	memset(m->buffer, 0, sizeof m->buffer);
	m->header = (struct nlmsghdr *)m->buffer;
	m->header->nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
	m->header->nlmsg_type = type;
	m->header->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
	struct genlmsghdr *genl = NLMSG_DATA(m->header);
	genl->cmd = command;
	genl->version = version;
}

static struct nlattr *put_attribute(struct message *m, uint16_t type, const void *data, size_t length)
{
	size_t at = NLMSG_ALIGN(m->header->nlmsg_len);
	size_t total = NLA_HDRLEN + length;
	if (at + NLA_ALIGN(total) > sizeof m->buffer)
		usage("the request does not fit in %d bytes", BUFFER_BYTES);
	struct nlattr *attribute = (struct nlattr *)(m->buffer + at);
	attribute->nla_type = type;
	attribute->nla_len = (uint16_t)total;
	if (length)
		memcpy((char *)attribute + NLA_HDRLEN, data, length);
	m->header->nlmsg_len = (uint32_t)(at + NLA_ALIGN(total));
	return attribute;
}

static void put_u32(struct message *m, uint16_t type, uint32_t value) { put_attribute(m, type, &value, sizeof value); }
static void put_u64(struct message *m, uint16_t type, uint64_t value) { put_attribute(m, type, &value, sizeof value); }
static void put_string(struct message *m, uint16_t type, const char *value) { put_attribute(m, type, value, strlen(value) + 1); }

static struct nlattr *nest_start(struct message *m, uint16_t type)
{
	return put_attribute(m, type | NLA_F_NESTED, NULL, 0);
}

static void nest_end(struct message *m, struct nlattr *nest)
{
	nest->nla_len = (uint16_t)(m->buffer + m->header->nlmsg_len - (char *)nest);
}

/* Walks the attributes in [data, data+length); calls visit for each. */
typedef void (*attribute_visitor)(const struct nlattr *attribute, void *context);

static void each_attribute(const void *data, size_t length, attribute_visitor visit, void *context)
{
	const char *at = data;
	const char *end = at + length;
	while (at + NLA_HDRLEN <= end) {
		const struct nlattr *attribute = (const struct nlattr *)at;
		if (attribute->nla_len < NLA_HDRLEN || at + attribute->nla_len > end)
			break;
		visit(attribute, context);
		at += NLA_ALIGN(attribute->nla_len);
	}
}

static const void *payload(const struct nlattr *attribute) { return (const char *)attribute + NLA_HDRLEN; }
static size_t payload_length(const struct nlattr *attribute) { return attribute->nla_len - NLA_HDRLEN; }
static uint16_t attribute_type(const struct nlattr *attribute) { return attribute->nla_type & NLA_TYPE_MASK; }

/* ---- talking to the kernel ---- */

static int open_netlink(void)
{
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
	if (fd < 0)
		fail(errno, NULL, "cannot open a generic netlink socket");
	struct sockaddr_nl local = { .nl_family = AF_NETLINK };
	if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0)
		fail(errno, NULL, "cannot bind the netlink socket");
	int one = 1;
	/* Extended acks carry the kernel's own words for a refusal; older kernels just ignore this. */
	setsockopt(fd, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
	return fd;
}

struct reply_context {
	uint16_t family;
	void (*on_message)(const struct nlmsghdr *header, void *context);
	void *context;
};

/* The message string of an extended ack, when the kernel sent one. */
static void find_ack_message(const struct nlattr *attribute, void *context)
{
	if (attribute_type(attribute) == NLMSGERR_ATTR_MSG && payload_length(attribute) > 0) {
		const char *text = payload(attribute);
		if (text[payload_length(attribute) - 1] == '\0')
			*(const char **)context = text;
	}
}

/*
 * Sends the request and reads replies until the kernel's ack. Returns 0, or the
 * (positive) errno the kernel refused with; `detail` gets its message if any.
 */
static int transact(int fd, struct message *m, struct reply_context *replies, char *detail, size_t detail_size)
{
	static uint32_t sequence = 1;
	m->header->nlmsg_seq = sequence++;
	detail[0] = '\0';
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	ssize_t sent;
	do
		sent = sendto(fd, m->buffer, m->header->nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel);
	while (sent < 0 && errno == EINTR);
	if (sent < 0)
		return errno;
	static char buffer[65536] __attribute__((aligned(NLMSG_ALIGNTO)));
	for (;;) {
		ssize_t received;
		do
			received = recv(fd, buffer, sizeof buffer, 0);
		while (received < 0 && errno == EINTR);
		if (received < 0)
			return errno;
		int remaining = (int)received;
		for (struct nlmsghdr *header = (struct nlmsghdr *)buffer; NLMSG_OK(header, remaining); header = NLMSG_NEXT(header, remaining)) {
			if (header->nlmsg_seq != m->header->nlmsg_seq)
				continue;
			if (header->nlmsg_type == NLMSG_ERROR) {
				const struct nlmsgerr *error = NLMSG_DATA(header);
				if (error->error == 0)
					return 0;
				if (header->nlmsg_flags & NLM_F_ACK_TLVS) {
					/* The original request follows (only its header when capped), then the ack's attributes. */
					size_t request_bytes = (header->nlmsg_flags & NLM_F_CAPPED) ? sizeof(struct nlmsghdr) : error->msg.nlmsg_len;
					size_t offset = NLMSG_HDRLEN + sizeof error->error + NLMSG_ALIGN(request_bytes);
					if (offset < header->nlmsg_len) {
						const char *message = NULL;
						each_attribute((const char *)header + offset, header->nlmsg_len - offset, find_ack_message, &message);
						if (message)
							snprintf(detail, detail_size, "%s", message);
					}
				}
				return -error->error;
			}
			if (header->nlmsg_type == NLMSG_DONE)
				return 0;
			if (replies && header->nlmsg_type == replies->family && replies->on_message)
				replies->on_message(header, replies->context);
		}
	}
}

static void family_id_from(const struct nlattr *attribute, void *context)
{
	if (attribute_type(attribute) == CTRL_ATTR_FAMILY_ID && payload_length(attribute) >= sizeof(uint16_t))
		memcpy(context, payload(attribute), sizeof(uint16_t));
}

static void on_family(const struct nlmsghdr *header, void *context)
{
	const char *attributes = (const char *)NLMSG_DATA(header) + GENL_HDRLEN;
	each_attribute(attributes, header->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN), family_id_from, context);
}

/* The id of the "nbd" family; a kernel without the nbd module has none. */
static uint16_t nbd_family(int fd)
{
	struct message m;
	message_start(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
	put_string(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
	uint16_t family = 0;
	struct reply_context replies = { .family = GENL_ID_CTRL, .on_message = on_family, .context = &family };
	char detail[512];
	int err = transact(fd, &m, &replies, detail, sizeof detail);
	if (err == ENOENT)
		refuse(ENODEV, "the kernel has no '" NBD_GENL_FAMILY_NAME "' netlink family here: load the nbd module (modprobe nbd); "
		       "where the kernel keeps that family to the host's network namespace (Linux 6.1 does), run in it (a pod with hostNetwork: true)");
	if (err)
		fail(err, detail, "cannot look up the '" NBD_GENL_FAMILY_NAME "' netlink family");
	if (!family)
		fail(EPROTONOSUPPORT, NULL, "the kernel answered the family lookup without an id");
	return family;
}

/* ---- commands ---- */

static void put_sockets(struct message *m, const struct options *o)
{
	struct nlattr *sockets = nest_start(m, NBD_ATTR_SOCKETS);
	for (int i = 0; i < o->fd_count; i++) {
		struct nlattr *item = nest_start(m, NBD_SOCK_ITEM);
		put_u32(m, NBD_SOCK_FD, (uint32_t)o->fds[i]);
		nest_end(m, item);
	}
	nest_end(m, sockets);
}

static void put_timeouts(struct message *m, const struct options *o)
{
	if (o->have_timeout)
		put_u64(m, NBD_ATTR_TIMEOUT, o->timeout);
	if (o->have_dead_conn_timeout)
		put_u64(m, NBD_ATTR_DEAD_CONN_TIMEOUT, o->dead_conn_timeout);
}

/* A netlink socket, and a request for `command` of the nbd family begun in `m`. */
static int begin_request(struct message *m, uint8_t command, uint16_t *family)
{
	int fd = open_netlink();
	*family = nbd_family(fd);
	message_start(m, *family, command, NBD_GENL_VERSION);
	return fd;
}

static void index_from(const struct nlattr *attribute, void *context)
{
	if (attribute_type(attribute) == NBD_ATTR_INDEX && payload_length(attribute) >= sizeof(uint32_t)) {
		memcpy(context, payload(attribute), sizeof(uint32_t));
		((uint32_t *)context)[1] = 1;
	}
}

static void on_connect_reply(const struct nlmsghdr *header, void *context)
{
	const char *attributes = (const char *)NLMSG_DATA(header) + GENL_HDRLEN;
	each_attribute(attributes, header->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN), index_from, context);
}

static void connect_device(const struct options *o)
{
	if (!o->have_size || !o->have_block_size || !o->have_server_flags)
		usage("connect needs --size, --block-size and --server-flags");
	if (o->fd_count == 0)
		usage("connect needs at least one --fd");
	struct message m;
	uint16_t family;
	int fd = begin_request(&m, NBD_CMD_CONNECT, &family);
	if (o->have_index)
		put_u32(&m, NBD_ATTR_INDEX, o->index);
	put_u64(&m, NBD_ATTR_SIZE_BYTES, o->size);
	put_u64(&m, NBD_ATTR_BLOCK_SIZE_BYTES, o->block_size);
	put_u64(&m, NBD_ATTR_SERVER_FLAGS, o->server_flags);
	put_timeouts(&m, o);
	if (o->identifier)
		put_string(&m, NBD_ATTR_BACKEND_IDENTIFIER, o->identifier);
	put_sockets(&m, o);
	uint32_t index[2] = { 0, 0 }; /* the index, and whether the reply had one */
	struct reply_context replies = { .family = family, .on_message = on_connect_reply, .context = index };
	char detail[512];
	int err = transact(fd, &m, &replies, detail, sizeof detail);
	if (err)
		fail(err, detail, "NBD_CMD_CONNECT of %d socket(s) refused", o->fd_count);
	if (!index[1])
		fail(EPROTONOSUPPORT, NULL, "the kernel connected a device but did not say which");
	printf("{\"ok\":true,\"index\":%" PRIu32 "}\n", index[0]);
}

static void reconfigure_device(const struct options *o)
{
	if (!o->have_index)
		usage("reconfigure needs --index");
	if (o->have_block_size || o->have_server_flags)
		usage("reconfigure cannot change --block-size or --server-flags; disconnect and connect again");
	struct message m;
	uint16_t family;
	int fd = begin_request(&m, NBD_CMD_RECONFIGURE, &family);
	put_u32(&m, NBD_ATTR_INDEX, o->index);
	if (o->have_size)
		put_u64(&m, NBD_ATTR_SIZE_BYTES, o->size);
	put_timeouts(&m, o);
	if (o->identifier)
		put_string(&m, NBD_ATTR_BACKEND_IDENTIFIER, o->identifier);
	if (o->fd_count)
		put_sockets(&m, o);
	char detail[512];
	int err = transact(fd, &m, NULL, detail, sizeof detail);
	if (err)
		fail(err, detail, "NBD_CMD_RECONFIGURE of /dev/nbd%" PRIu32 " refused", o->index);
	printf("{\"ok\":true,\"index\":%" PRIu32 "}\n", o->index);
}

static void disconnect_device(const struct options *o)
{
	if (!o->have_index)
		usage("disconnect needs --index");
	struct message m;
	uint16_t family;
	int fd = begin_request(&m, NBD_CMD_DISCONNECT, &family);
	put_u32(&m, NBD_ATTR_INDEX, o->index);
	char detail[512];
	int err = transact(fd, &m, NULL, detail, sizeof detail);
	if (err)
		fail(err, detail, "NBD_CMD_DISCONNECT of /dev/nbd%" PRIu32 " refused", o->index);
	printf("{\"ok\":true,\"index\":%" PRIu32 "}\n", o->index);
}

struct device_status {
	uint32_t index;
	int have_index;
	int connected;
};

/* Devices in a STATUS reply; the nbd driver's own limit (nbds_max) is far below this. */
#define MAX_DEVICES 4096

struct status_list {
	struct device_status devices[MAX_DEVICES];
	int count;
};

static void device_field(const struct nlattr *attribute, void *context)
{
	struct device_status *device = context;
	if (attribute_type(attribute) == NBD_DEVICE_INDEX && payload_length(attribute) >= sizeof(uint32_t)) {
		memcpy(&device->index, payload(attribute), sizeof(uint32_t));
		device->have_index = 1;
	} else if (attribute_type(attribute) == NBD_DEVICE_CONNECTED && payload_length(attribute) >= 1) {
		device->connected = *(const uint8_t *)payload(attribute) != 0;
	}
}

static void device_item(const struct nlattr *attribute, void *context)
{
	struct status_list *list = context;
	if (attribute_type(attribute) != NBD_DEVICE_ITEM || list->count == MAX_DEVICES)
		return;
	struct device_status device = { 0 };
	each_attribute(payload(attribute), payload_length(attribute), device_field, &device);
	if (device.have_index)
		list->devices[list->count++] = device;
}

static void device_list(const struct nlattr *attribute, void *context)
{
	if (attribute_type(attribute) == NBD_ATTR_DEVICE_LIST)
		each_attribute(payload(attribute), payload_length(attribute), device_item, context);
}

static void on_status_reply(const struct nlmsghdr *header, void *context)
{
	const char *attributes = (const char *)NLMSG_DATA(header) + GENL_HDRLEN;
	each_attribute(attributes, header->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN), device_list, context);
}

static void status_of_devices(const struct options *o)
{
	struct message m;
	uint16_t family;
	int fd = begin_request(&m, NBD_CMD_STATUS, &family);
	if (o->have_index)
		put_u32(&m, NBD_ATTR_INDEX, o->index);
	static struct status_list list;
	struct reply_context replies = { .family = family, .on_message = on_status_reply, .context = &list };
	char detail[512];
	int err = transact(fd, &m, &replies, detail, sizeof detail);
	if (err)
		fail(err, detail, "NBD_CMD_STATUS refused");
	printf("{\"ok\":true,\"devices\":[");
	for (int i = 0; i < list.count; i++)
		printf("%s{\"index\":%" PRIu32 ",\"connected\":%s}", i ? "," : "", list.devices[i].index, list.devices[i].connected ? "true" : "false");
	printf("]}\n");
}

int main(int argc, char **argv)
{
	struct options o;
	parse_options(argc, argv, &o);
	if (!strcmp(o.command, "connect"))
		connect_device(&o);
	else if (!strcmp(o.command, "reconfigure"))
		reconfigure_device(&o);
	else if (!strcmp(o.command, "disconnect"))
		disconnect_device(&o);
	else if (!strcmp(o.command, "status"))
		status_of_devices(&o);
	else
		usage("unknown command '%s'", o.command);
	return 0;
}
