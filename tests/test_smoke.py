from adaccounts.v1 import ad_accounts_pb2 as pb
from conftest import new_account


def test_create_then_get(stub):
    created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()))
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id)) == created
