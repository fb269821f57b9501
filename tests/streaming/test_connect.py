"""REDIS_URL's forms (README, Redis topologies), parsed in one place: a Sentinel URL's
Sentinels, service, database and credentials, and Celery's broker for it; any other
form is refused with a message that lists the ones there are."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from kinora.streaming import connect, keys


def test_a_sentinel_url_names_its_sentinels_service_and_database() -> None:
    where = connect.topology(
        "redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/kinora/2"
        "?sentinel_password=watch"
    )
    assert where.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (where.service, where.db, where.username, where.password) == (
        "kinora", 2, "app", "s3cret",
    )  # fmt: skip
    assert (where.tls, where.sentinel_password) == (False, "watch")
    assert connect.topology("rediss+sentinel://s1:26379/kinora").tls
    broker, options = connect.celery_broker("redis+sentinel://:pw@s1:26379,s2:26380/kinora/1")
    assert broker == "sentinel://:pw@s1:26379/1;sentinel://:pw@s2:26380/1"
    assert options == {"master_name": "kinora"}


def test_a_cluster_url_names_some_of_its_nodes_and_is_no_broker() -> None:
    where = connect.topology("rediss+cluster://app:s3cret@10.0.0.1:7001,10.0.0.2,[::1]:7003")
    assert where.cluster
    assert not where.sentinel
    assert where.nodes == (("10.0.0.1", 7001), ("10.0.0.2", 6379), ("::1", 7003))
    assert (where.username, where.password, where.tls) == ("app", "s3cret", True)
    with pytest.raises(ValueError, match="set BROKER_URL"):
        connect.celery_broker("redis+cluster://n1:7001")


def test_a_jobs_keys_share_its_channels_hash_slot() -> None:
    """On a cluster, the publishing script touches the job's four keys and publishes on
    its channel: one slot, or Redis refuses it (CROSSSLOT)."""
    for key in (keys.video(7), keys.job("render-2026-12-03.7"), keys.of("import", "a:b")):
        slots = {key_slot(name.encode()) for name in (key.seq, key.history, key.end, key.sent)}
        assert slots == {key_slot(key.channel.encode())}, key
    with pytest.raises(ValueError, match="may not contain braces"):
        keys.job("render-{7}")


def test_a_server_url_is_itself() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://user:pw@cache:6380/0", "unix:///r.sock"):
        assert not connect.topology(url).sentinel
        assert connect.celery_broker(url) == (url, {})


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://cache:6379", "not a Redis URL Kinora knows"),
        ("redis-sentinel://s1:26379/kinora", "not a Redis URL Kinora knows"),
        ("redis+sentinel://s1:26379", "names its Sentinels and the primary's service"),
        ("redis+sentinel:///kinora", "names its Sentinels and the primary's service"),
        ("redis+sentinel://s1:26379/kinora/zero", "names its Sentinels and the primary's"),
        ("redis+cluster://", "names some of its nodes and nothing else"),
        ("redis+cluster://n1:7001/2", "names some of its nodes and nothing else"),
        ("redis+cluster://n1:first", "a cluster node's port is a number"),
    ],
)
def test_a_url_of_no_known_form_says_which_forms_there_are(url: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        connect.topology(url)
