/*
 * printf.c — a small vsnprintf: flags '-' '0' '#', field width, the length
 * modifiers hh h l ll z, and the conversions d i u x X p s c %.
 */
#include "tg.h"

struct out {
    char *buf;
    size_t size, len;
};

static void put(struct out *o, char c) {
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void put_padded(struct out *o, const char *s, size_t n, unsigned width, int left, char pad) {
    size_t fill = width > n ? width - n : 0;
    if (!left)
        while (fill--)
            put(o, pad);
    while (n--)
        put(o, *s++);
    if (left)
        while (fill--)
            put(o, ' ');
}

static void put_number(struct out *o, u64 v, int negative, unsigned base, int upper, unsigned width, int left,
                       int zero, const char *prefix) {
    char tmp[24];
    size_t n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    size_t plen = strlen(prefix) + (negative ? 1 : 0);
    size_t total = n + plen;
    size_t fill = width > total ? width - total : 0;
    if (!left && !zero)
        while (fill--)
            put(o, ' ');
    if (negative)
        put(o, '-');
    while (*prefix)
        put(o, *prefix++);
    if (!left && zero)
        while (fill--)
            put(o, '0');
    while (n)
        put(o, tmp[--n]);
    if (left)
        while (fill--)
            put(o, ' ');
}

int tg_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap) {
    struct out o = { buf, size, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        int left = 0, zero = 0, alt = 0;
        for (;; fmt++) {
            if (fmt[1] == '-')
                left = 1;
            else if (fmt[1] == '0')
                zero = 1;
            else if (fmt[1] == '#')
                alt = 1;
            else
                break;
        }
        fmt++;
        unsigned width = 0;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (unsigned)(*fmt++ - '0');
        int lng = 0; /* 0 int, 1 long, 2 long long, -1 short, -2 char */
        for (;; fmt++) {
            if (*fmt == 'l' || *fmt == 'z')
                lng++;
            else if (*fmt == 'h')
                lng--;
            else
                break;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            i64 v = lng > 0 ? va_arg(ap, i64) : va_arg(ap, int);
            if (lng == -1)
                v = (short)v;
            else if (lng <= -2)
                v = (signed char)v;
            u64 mag = v < 0 ? (u64)0 - (u64)v : (u64)v;
            put_number(&o, mag, v < 0, 10, 0, width, left, zero, "");
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            u64 v = lng > 0 ? va_arg(ap, u64) : va_arg(ap, unsigned);
            if (lng == -1)
                v = (u16)v;
            else if (lng <= -2)
                v = (u8)v;
            unsigned base = *fmt == 'u' ? 10 : 16;
            put_number(&o, v, 0, base, *fmt == 'X', width, left, zero, alt && base == 16 ? "0x" : "");
            break;
        }
        case 'p':
            put_number(&o, (u64)va_arg(ap, void *), 0, 16, 0, width, left, zero, "0x");
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            put_padded(&o, s, strlen(s), width, left, ' ');
            break;
        }
        case 'c': {
            char c = (char)va_arg(ap, int);
            put_padded(&o, &c, 1, width, left, ' ');
            break;
        }
        case '%':
            put(&o, '%');
            break;
        case '\0':
            fmt--;
            break;
        default: /* unknown conversion: print it as is */
            put(&o, '%');
            put(&o, *fmt);
            break;
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = '\0';
    return (int)o.len;
}

int tg_snprintf(char *buf, size_t size, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = tg_vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int tg_printf(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = tg_vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    size_t len = (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1;
    tg_console_write(buf, len);
    return n;
}
