"""Which webhook URLs may be called, and at which address (SSRF guard).

A webhook URL is chosen by the caller, but the request comes from inside our network: without rules, a tenant
could make the worker POST to ``http://169.254.169.254/`` (cloud metadata), ``http://localhost:6379`` (our Redis)
or any private service, and read the outcome in the job's delivery log. So:

1. Syntax (:func:`check_syntax`): ``http``/``https`` only, at most 2048 characters, a host, no user name or
   password in the URL (they would travel to the receiver in clear and in our logs), no whitespace or control
   characters.
2. Addresses (:func:`check_url`): the host is resolved and EVERY address it resolves to must be public. Refused:
   loopback, unspecified, RFC 1918 private, link-local, shared/CGNAT (100.64/10), multicast, IPv6 unique-local
   and site-local, cloud metadata endpoints (also public ones such as Azure's 168.63.129.16), IPv4 embedded in
   IPv6 (mapped, NAT64, 6to4, IPv4-compatible) when the IPv4 is refused, and anything else the IANA registries
   mark as not globally reachable (documentation, benchmarking, reserved ranges). Weird spellings such as
   ``http://0x7f.1/`` or ``http://2130706433/`` are caught because the check runs on what the resolver returns,
   not on the text.
3. Exceptions: ``SECATEURS_WEBHOOK_ALLOW`` lists host names and IP addresses/CIDRs that may be reached anyway
   (a receiver on this machine in tests, an internal service in a private deployment). A listed host name
   permits whatever it resolves to; a listed network permits those addresses for any host name.
4. Pinning (DNS rebinding): the check returns a :class:`Target` holding the address it checked. The delivery
   connects to that address (the URL's host replaced by the IP), sends the real name in ``Host`` and, for
   https, as TLS SNI and for certificate verification (httpx's ``sni_hostname`` request extension), so a
   name that resolves to a public address for the check and to 127.0.0.1 a moment later cannot redirect the
   request. The check runs when the URL is given (422 at job creation) and again before every attempt.

Limits: name resolution uses the system resolver, which has no timeout of its own (the resolver's, usually
a few seconds); environment proxies are not used for deliveries (a proxy would resolve the name itself and
undo the pin); redirects are never followed (a 3xx is a failed attempt), so a receiver cannot bounce the
request to an internal address either.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses it resolves to, as text. Tests inject one; production uses getaddrinfo.
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
SCHEMES = ("http", "https")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*$")

# Cloud instance metadata services: the classic SSRF prize. Most are link-local or private already; they are
# named first so the refusal says what the address is. 168.63.129.16 (Azure's WireServer) is public.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS DNS over IPv6
    )
)
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})

# (network, what to call it), first match wins; anything not globally reachable is refused after these.
_NAMED_V4: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(n), why)
    for n, why in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("169.254.0.0/16", "link-local"),
        ("100.64.0.0/10", "shared address space (CGNAT, RFC 6598)"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_NAMED_V6: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(n), why)
    for n, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("fc00::/7", "unique local (IPv6 ULA)"),
        ("fec0::/10", "site-local (deprecated IPv6)"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class UnsafeWebhookUrl(ValueError):
    """Raised when a webhook URL may not be called; the message says why, in words for the API's 422."""


def forbidden_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be a webhook target (e.g. ``"loopback"``), or None when it is public."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata endpoint"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = forbidden_reason(embedded)
            return f"IPv4 {embedded} inside IPv6, which is {inner}" if inner else None
        named = _NAMED_V6
    else:
        named = _NAMED_V4
    for network, why in named:
        if address in network:
            return why
    if not address.is_global:
        return "not globally reachable (reserved, documentation or special-purpose range)"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to a v4 host (mapped, 6to4, NAT64, IPv4-compatible), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class AllowList:
    """``SECATEURS_WEBHOOK_ALLOW``: addresses that may be reached although :func:`forbidden_reason` refuses
    them. It only ever widens what is allowed; public addresses need no entry."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """Comma-separated IP addresses, CIDRs and host names; ValueError naming a bad entry."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.rstrip(".")
            if not _HOST_NAME.fullmatch(name) or name.replace(".", "").isdigit():
                raise ValueError(
                    f"SECATEURS_WEBHOOK_ALLOW entry {raw.strip()!r} is neither an IP address or CIDR "
                    "(e.g. 127.0.0.1/32, 10.0.0.0/8) nor a host name (e.g. hooks.internal)"
                )
            hosts.add(name)
        return cls(tuple(networks), frozenset(hosts))

    def permits(self, host: str, address: IPAddress) -> bool:
        if host.rstrip(".").lower() in self.hosts:
            return True
        return any(address.version == n.version and address in n for n in self.networks)


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the one address a delivery may connect to."""

    url: str
    scheme: str
    host: str  # ASCII (IDNA) form, lower case, no brackets
    port: int
    path: str  # path and query, as sent
    address: IPAddress

    @property
    def connect_url(self) -> str:
        """The URL with the checked address in place of the host name (what httpx connects to)."""
        ip = f"[{self.address.compressed}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{ip}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def request_extensions(self) -> dict[str, str]:
        """For https, present and verify the certificate for the real name, not the IP we connect to."""
        return {"sni_hostname": self.host} if self.scheme == "https" else {}


def check_syntax(url: str) -> httpx.URL:
    """Step 1 (no network): the URL parsed, or UnsafeWebhookUrl saying what is wrong with it."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeWebhookUrl(
            f"the URL is {len(url)} characters long; at most {MAX_URL_LENGTH} are accepted"
        )
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise UnsafeWebhookUrl("the URL contains whitespace or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise UnsafeWebhookUrl(f"the URL cannot be parsed ({exc})") from exc
    if parsed.scheme not in SCHEMES:
        shown = parsed.scheme or "none"
        raise UnsafeWebhookUrl(f"only http:// and https:// URLs can receive webhooks (scheme: {shown})")
    if parsed.userinfo:
        raise UnsafeWebhookUrl(
            "the URL carries a user name or password; put a token in the path or query instead, and verify "
            "the webhook-signature header"
        )
    if not parsed.host:
        raise UnsafeWebhookUrl("the URL has no host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise UnsafeWebhookUrl(f"port {parsed.port} does not exist (1-65535)")
    return parsed


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), as the system resolver answers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, allow: AllowList, resolver: Resolver = system_resolver) -> Target:
    """Steps 1-3: the URL's :class:`Target` (with the address to pin), or UnsafeWebhookUrl saying why not."""
    parsed = check_syntax(url)
    host = parsed.raw_host.decode("ascii").lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if host.rstrip(".") in METADATA_HOSTS and host.rstrip(".") not in allow.hosts:
        raise UnsafeWebhookUrl(f"host {host} is a cloud metadata service")
    try:
        answers = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise UnsafeWebhookUrl(f"host {host} does not resolve ({exc})") from exc
    addresses = _addresses(answers)
    if not addresses:
        raise UnsafeWebhookUrl(f"host {host} resolves to no address")
    for address in addresses:
        why = forbidden_reason(address)
        if why and not allow.permits(host, address):
            shown = (
                host if host == address.compressed else f"host {host} resolves to {address.compressed}, which"
            )
            raise UnsafeWebhookUrl(
                f"{shown} is {why}; webhooks only go to public addresses unless SECATEURS_WEBHOOK_ALLOW "
                "lists it"
            )
    path = parsed.raw_path.decode("ascii") or "/"
    return Target(url=url, scheme=parsed.scheme, host=host, port=port, path=path, address=addresses[0])


def _addresses(answers: Iterable[str]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for text in answers:
        # getaddrinfo appends "%<zone>" to scoped IPv6 addresses; the zone does not change what it is.
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if address not in out:
            out.append(address)
    return out
