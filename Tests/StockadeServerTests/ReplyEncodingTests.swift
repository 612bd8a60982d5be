import NIOCore
import StockadeCore
import Testing
@testable import StockadeServer

@Suite struct ReplyEncodingTests {
    /// Every rejection, with associated values that give its error text a second word.
    static let rejections: [Rejection] = [
        .soldOut, .insufficient(available: 3), .limitReached(bought: 1, limit: 1), .noSuchSku, .paused, .badQuantity,
        .badArgument("value is not an integer"), .skuExists, .belowCommitted(committed: 7), .noSuchOrder, .expired,
        .wrongState(.paid), .requestInFlight, .requestConflict(OrderID(rawValue: 42)), .busy,
        .unavailable("fdatasync failed"), .readOnly, .notReplicated(acknowledged: 0, wanted: 1), .replicatedTooLate(wanted: 1),
    ]

    /// The metrics label of a rejected reply is its error code (the first word of the error text the
    /// client gets) in lower case: the labels are fixed literals, so each must stay that code.
    @Test(arguments: rejections)
    func aRejectionsOutcomeLabelIsItsErrorCodeInLowerCase(rejection: Rejection) {
        let code = ReplyEncoding.errorText(rejection).prefix { $0 != " " }.lowercased()
        #expect(ReplyEncoding.outcome(.rejected(rejection)) == code)
        var out = ByteBuffer()
        ReplyEncoding.write(.rejected(rejection), into: &out)
        #expect(out.readString(length: out.readableBytes)?.hasPrefix("-\(code.uppercased())") == true)
    }

    @Test func everyOtherReplyIsOK() {
        #expect(ReplyEncoding.outcome(.done) == "ok")
        #expect(ReplyEncoding.outcome(.deducted(0)) == "ok")
        #expect(ReplyEncoding.outcome(.deducted(-1)) == "ok")
    }
}
