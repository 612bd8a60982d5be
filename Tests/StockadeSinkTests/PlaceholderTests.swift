import Testing
@testable import StockadeSink
