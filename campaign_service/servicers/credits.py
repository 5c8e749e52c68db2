"""whago.campaign.v1.CreditService: protobuf <-> campaign_service.ops.credits."""

from __future__ import annotations

from typing import Any

import grpc

from campaign_service import auth, convert
from campaign_service.ops import Operations
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import credit_service_pb2_grpc as crs_grpc


class CreditServicer(crs_grpc.CreditServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def GetCreditBalance(self, request: crs.GetCreditBalanceRequest,
                         context: grpc.ServicerContext) -> crs.CreditBalance:
        return convert.credit_balance(self.ops.credits.get_balance(auth.current_user_id()))

    def ListCreditTransactions(self, request: crs.ListCreditTransactionsRequest,
                               context: grpc.ServicerContext) -> crs.ListCreditTransactionsResponse:
        page = self.ops.credits.list_transactions(auth.current_user_id(), request.page_size, request.page_token,
                                                  request.campaign_id, request.kind)
        return crs.ListCreditTransactionsResponse(transactions=[convert.credit_transaction(t) for t in page.items],
                                                  next_page_token=page.next_page_token)


def add_to_server(server: Any, ops: Operations) -> None:
    crs_grpc.add_CreditServiceServicer_to_server(CreditServicer(ops), server)
