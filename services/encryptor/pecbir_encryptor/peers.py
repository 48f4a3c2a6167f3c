"""Key release by other hospitals: the keys of their images among this hospital's hits.

A search of a collection another hospital shares finds that hospital's images; only its
encryptor holds their keys. It is asked over its key-release route (`ENCRYPTOR_KEY_RELEASE`)
with a user token it issued to this hospital, checks its own integrity tag first and audits
the decision; this side audits what it asked and what it got. An owner with no agreement
here, or one that refuses, leaves the hit "not released".
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from pecbir_contracts.routes import ENCRYPTOR_KEY_RELEASE
from pecbir_encryptor.settings import PeerEncryptor

__all__ = ["NotReleased", "PeerKeys"]


class NotReleased(Exception):
    """The owner of an image did not release its key (no agreement, refused, unreachable).

    Parameters
    ----------
    owner
        The owning hospital.
    reason
        Why, in words a user can read.
    """

    def __init__(self, owner: str, reason: str) -> None:
        super().__init__(f"{owner}: {reason}")
        self.owner = owner
        self.reason = reason


class PeerKeys:
    """The other hospitals' encryptors this one may ask for keys.

    Parameters
    ----------
    clients
        One HTTP client per owner tenant, its base URL and bearer token set.
    """

    def __init__(self, clients: Mapping[str, httpx.Client] | None = None) -> None:
        self.clients: dict[str, httpx.Client] = dict(clients or {})

    @classmethod
    def from_settings(cls, peers: Mapping[str, PeerEncryptor], timeout_s: float) -> PeerKeys:
        """Clients of the encryptors named in the settings.

        Parameters
        ----------
        peers
            Owner tenant → its encryptor's URL and the token it issued to this hospital.
        timeout_s
            Timeout of each request.

        Returns
        -------
        PeerKeys
            Ready to ask.
        """
        return cls(
            {
                owner: httpx.Client(
                    base_url=peer.url,
                    timeout=timeout_s,
                    headers={"authorization": f"Bearer {peer.token.get_secret_value()}"},
                )
                for owner, peer in peers.items()
            }
        )

    def add(self, owner: str, client: httpx.Client) -> None:
        """Ask `owner` through `client` from now on (embedded systems, tests).

        Parameters
        ----------
        owner
            The owning hospital's tenant.
        client
            A client of its encryptor, its token set.
        """
        self.clients[owner] = client

    def release(self, owner: str, collection: str, image_id: str) -> dict[str, object]:
        """The owner's key-release answer for one of its images.

        Parameters
        ----------
        owner, collection, image_id
            Whose image, in which of its collections, under which cloud id.

        Returns
        -------
        dict
            ``mode`` and the key (pe: ``key``; sealed: ``data_key``).

        Raises
        ------
        NotReleased
            No agreement with `owner`, its refusal (with its reason) or no answer.
        """
        client = self.clients.get(owner)
        if client is None:
            raise NotReleased(owner, "no key-release agreement with this hospital")
        try:
            answer = client.post(
                ENCRYPTOR_KEY_RELEASE, json={"collection": collection, "image_id": image_id}
            )
        except httpx.HTTPError as exc:
            reason = f"its encryptor did not answer ({type(exc).__name__})"
            raise NotReleased(owner, reason) from None
        if answer.status_code != 200:
            try:
                detail = str(answer.json().get("detail", ""))[:160]
            except ValueError:
                detail = answer.text[:160]
            raise NotReleased(owner, f"refused ({answer.status_code}): {detail}")
        body = answer.json()
        if not isinstance(body, dict) or body.get("image_id") != image_id:
            raise NotReleased(owner, "its answer names another image")
        return body
